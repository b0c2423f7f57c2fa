#include "common/files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace kb {
namespace {

const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "something other than a file";
}

// Closes the descriptor on every path out of read_small_file.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string describe_bytes(std::size_t bytes) {
  if (bytes >= (1u << 20) && bytes % (1u << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= 1024 && bytes % 1024 == 0) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " bytes";
}

std::string read_small_file(const std::string& path, std::size_t max_bytes) {
  // O_NONBLOCK: opening a FIFO for reading must not wait for a writer; it is refused below.
  Fd file{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)};
  if (file.fd < 0) throw FileReadError(path, std::strerror(errno));
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) throw FileReadError(path, std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw FileReadError(path, std::string("it is ") + kind_of(st.st_mode) + ", not a regular file");
  const auto too_large = [&] {
    return FileReadError(
        path, "it is larger than " + describe_bytes(max_bytes) + "; is it the right file?");
  };
  if (static_cast<std::size_t>(st.st_size) > max_bytes) throw too_large();
  std::string content;
  content.reserve(static_cast<std::size_t>(st.st_size));
  char buffer[16384];
  for (;;) {
    const ssize_t n = ::read(file.fd, buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw FileReadError(path, std::strerror(errno));
    }
    if (n == 0) break;
    if (content.size() + static_cast<std::size_t>(n) > max_bytes) throw too_large();
    content.append(buffer, static_cast<std::size_t>(n));
  }
  return content;
}

}  // namespace kb
