#pragma once
// libcurl's multi interface driven by a Boost.Asio io_context: curl never blocks the loop (Asio
// watches curl's sockets and timer, curl_multi_socket_action does the work), and one multi handle
// means one connection cache, so requests to the same site reuse connections.
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kb::unicore {

struct TlsOptions {
  bool verify = true;   // false: neither the peer certificate nor the host name is checked
  std::string ca_file;  // PEM bundle to trust; empty = the system bundle
};

struct HttpRequest {
  std::string method = "GET";  // GET, POST, PUT or DELETE
  std::string url;
  std::vector<std::string> headers;  // "Name: value"
  std::string body;
  bool send_body = false;  // send `body` (even when empty) with POST/PUT/DELETE
  std::chrono::milliseconds connect_timeout{10'000};
  std::chrono::milliseconds total_timeout{60'000};
  std::size_t max_body = std::size_t{16} << 20;  // a longer reply body aborts the transfer
  // Use a new connection. curl silently repeats a request whose *reused* connection turns out dead
  // before any answer; for a non-idempotent request that could do it twice, so those ask for this.
  bool fresh_connection = false;
  TlsOptions tls;
};

enum class TransportError {
  none,
  resolve,         // host name did not resolve
  connect,         // TCP connect failed or timed out before the request was sent
  tls,             // TLS handshake or certificate verification failed
  timeout,         // the whole exchange took longer than total_timeout
  body_too_large,  // reply body exceeded max_body
  send,            // connection broke while sending
  receive,         // connection broke while receiving, or the server closed without an answer
  other,
};
const char* to_string(TransportError error);

struct HttpResponse {
  TransportError error = TransportError::none;
  std::string error_message;  // curl's description when error != none
  bool request_sent = false;  // false: no request byte left this host, so any method may be retried
  long status = 0;            // HTTP status of the final response, 0 when none arrived
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;
  std::chrono::microseconds elapsed{0};

  // The last header with this (lower-case) name, or nullptr.
  const std::string* header(std::string_view lower_name) const;
};

// Who may call: only the thread running the io_context given to the constructor (the bridge's event
// loop or the CLI's). Construct, start() and destroy there; callbacks are posted to that
// io_context.
class HttpEngine {
 public:
  using Callback = std::function<void(HttpResponse)>;

  explicit HttpEngine(boost::asio::io_context& io);
  // Abandons requests still in flight: their callbacks are never called after destruction.
  ~HttpEngine();
  HttpEngine(const HttpEngine&) = delete;
  HttpEngine& operator=(const HttpEngine&) = delete;

  // Starts the request; never blocks. `done` is always called exactly once (later, via post),
  // unless the engine is destroyed first.
  void start(HttpRequest request, Callback done);

  std::size_t in_flight() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kb::unicore
