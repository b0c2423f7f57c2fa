#pragma once
// Reading the small files a person or another program hands us (configuration, tokens, secrets,
// connection files): whole, bounded, and only from regular files, so that a path to /dev/zero,
// a FIFO or a directory gets a sentence instead of a hang, an endless read or a misleading parse
// error. Free functions, callable from any thread (they block on the file system).
#include <cstddef>
#include <stdexcept>
#include <string>

namespace kb {

// Thrown by read_small_file. what() names the file ("/dev/zero: it is a character device, not a
// regular file"); reason() is the same without the path, for messages that name it already.
class FileReadError : public std::runtime_error {
 public:
  FileReadError(const std::string& path, std::string reason)
      : std::runtime_error(path + ": " + reason), reason_(std::move(reason)) {}
  const std::string& reason() const { return reason_; }

 private:
  std::string reason_;
};

// The whole content of the regular file at `path` (symlinks followed). Refuses directories,
// FIFOs, sockets and devices without blocking on them, and files larger than `max_bytes`
// (checked before and while reading, so a file that grows is refused too).
std::string read_small_file(const std::string& path, std::size_t max_bytes);

// "64 KiB", "1 MiB": a byte count as people read it (for the messages above).
std::string describe_bytes(std::size_t bytes);

}  // namespace kb
