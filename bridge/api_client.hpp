#pragma once
// ControlClient: a small blocking HTTP/1.1 client for the bridge's control API on its Unix socket,
// for the command-line front doors (`kernel-bridge kernel|list|status|stop`), which are short-lived
// processes, not the daemon: blocking is fine there. One connection per request (Connection:
// close). An instance may be used by one thread at a time; separate instances in separate threads.
#include <nlohmann/json.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kb::bridge {

// The daemon could not be reached or did not answer in time. what() says which socket and what to
// do.
struct ControlUnreachable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ControlResponse {
  int status = 0;
  nlohmann::json body;  // null when the body is empty or not JSON
  std::string raw;

  bool ok() const { return status >= 200 && status < 300; }
  // The API's error sentence (with the field at fault, when named), or a generic one.
  std::string error_message() const;
};

class ControlClient {
 public:
  explicit ControlClient(std::string socket_path);

  // $KERNEL_BRIDGE_SOCKET, else /run/kernel-bridge/api.sock.
  static std::string default_socket();

  // Sends one request and returns the answer. Throws ControlUnreachable when the socket cannot be
  // connected or no complete answer arrives within `timeout`.
  ControlResponse request(std::string_view method, const std::string& target,
                          const nlohmann::json* body = nullptr,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30)) const;

  const std::string& socket_path() const { return socket_path_; }

 private:
  std::string socket_path_;
};

// "a/b c" → "a%2Fb%20c": an id or user name as one path segment.
std::string url_segment(std::string_view text);

}  // namespace kb::bridge
