#pragma once
// Jupyter connection files: reading them (every field validated; errors name the file and the
// field) and writing them (mode 0600 from the first byte, atomically by rename). Used at start-up
// by the tunnel command (hub side) and by the agent when it starts a kernel. Plain functions:
// callable from any thread; they do blocking file I/O on small local files only.
#include "link/session.hpp"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kb::tunnel {

// Thrown for an unreadable or invalid connection file; the message names the file, the field and
// what to do.
struct ConnectionFileError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ConnectionInfo {
  std::string ip = "127.0.0.1";
  std::string transport = "tcp";
  std::array<std::uint16_t, kChannelKinds> ports{};  // indexed by ChannelKind
  std::string key;  // the Jupyter HMAC key (may be empty: unsigned)
  std::string signature_scheme = "hmac-sha256";
  std::string kernel_name;
  // Fields we do not interpret (e.g. jupyter_client's "jupyter_session") are kept when the file
  // is rewritten.
  nlohmann::json extra = nlohmann::json::object();

  std::uint16_t port(ChannelKind kind) const { return ports[static_cast<std::size_t>(kind)]; }
  std::uint16_t& port(ChannelKind kind) { return ports[static_cast<std::size_t>(kind)]; }
  nlohmann::json to_json() const;
};

// "shell_port", "iopub_port", ... — the connection file's name for each channel's port.
const char* port_field(ChannelKind kind);

struct ParseOptions {
  // The hub side accepts port 0 ("choose one for me"); a kernel's file must name real ports.
  bool allow_zero_ports = false;
};

// Validates a parsed connection file; `source` (the file name) is used in error messages.
ConnectionInfo parse_connection_info(const nlohmann::json& j, const std::string& source,
                                     ParseOptions options = {});
ConnectionInfo read_connection_file(const std::string& path, ParseOptions options = {});

// Writes `info` to `path`: a temporary file in the same directory created with O_EXCL and mode
// 0600, then renamed over `path`, so a reader never sees a partial file and nobody else ever can
// read the key. Throws ConnectionFileError naming the path.
void write_connection_file(const std::string& path, const ConnectionInfo& info);

// Writes `content` to `path` atomically (temporary file in the same directory, O_EXCL, `mode`,
// then rename). Throws ConnectionFileError naming the path and the OS error.
void write_file_atomic(const std::string& path, const std::string& content, unsigned mode);

// Five ports on 127.0.0.1 for a kernel, each held by a socket bound with SO_REUSEADDR but not
// listening, until release() or destruction. ZeroMQ binds its listeners with SO_REUSEADDR, so the
// kernel can bind and listen on them while they are held; meanwhile nobody else gets them — not
// another agent choosing ports (bind(0) skips them), not an outgoing connection's ephemeral port,
// and no TCP self-connect while the agent probes a port the kernel has not bound yet. This closes
// the "chosen free, taken before the kernel binds" race of choose_free_ports(). A kernel that binds
// WITHOUT SO_REUSEADDR cannot start while they are held. Throws ConnectionFileError.
class PortReservation {
 public:
  PortReservation() = default;
  static PortReservation reserve();
  ~PortReservation() { release(); }
  PortReservation(PortReservation&& other) noexcept;
  PortReservation& operator=(PortReservation&& other) noexcept;
  PortReservation(const PortReservation&) = delete;
  PortReservation& operator=(const PortReservation&) = delete;

  const std::array<std::uint16_t, kChannelKinds>& ports() const { return ports_; }
  void release();

 private:
  std::array<std::uint16_t, kChannelKinds> ports_{};
  std::array<int, kChannelKinds> fds_{-1, -1, -1, -1, -1};
};

// Five distinct free TCP ports on 127.0.0.1, found by binding port 0 (all five held open until the
// last is chosen, so they differ). Between our close and the kernel's bind another process could
// take one: the kernel then fails to bind and exits (ipykernel does not retry a port it was given),
// which the agent reports as kernel_exited — the same small race jupyter_client's KernelManager
// has. Throws ConnectionFileError if no port can be bound.
std::array<std::uint16_t, kChannelKinds> choose_free_ports();

}  // namespace kb::tunnel
