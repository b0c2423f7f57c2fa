#include "bridge/api_client.hpp"

#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include <cstdlib>

namespace kb::bridge {

namespace asio = boost::asio;
namespace http = boost::beast::http;

std::string ControlResponse::error_message() const {
  std::string message;
  std::string field;
  if (body.is_object()) {
    const nlohmann::json* e = &body;
    if (body.contains("error") && body["error"].is_object()) e = &body["error"];
    if (e->contains("message") && (*e)["message"].is_string())
      message = (*e)["message"].get<std::string>();
    else if (body.contains("error") && body["error"].is_string())
      message = body["error"].get<std::string>();
    if (e->contains("field") && (*e)["field"].is_string()) field = (*e)["field"].get<std::string>();
  }
  if (message.empty()) {
    message = "the bridge answered HTTP " + std::to_string(status);
    if (!raw.empty()) message += ": " + raw.substr(0, 300);
  }
  if (!field.empty() && message.find(field) == std::string::npos)
    message += " (field " + field + ")";
  return message;
}

ControlClient::ControlClient(std::string socket_path) : socket_path_(std::move(socket_path)) {}

std::string ControlClient::default_socket() {
  if (const char* s = std::getenv("KERNEL_BRIDGE_SOCKET"); s && *s) return s;
  return "/run/kernel-bridge/api.sock";
}

namespace {

std::string unreachable_hint(const std::string& path, const boost::system::error_code& ec) {
  using boost::system::errc::errc_t;
  std::string why = ec.message();
  if (ec == boost::system::errc::no_such_file_or_directory) {
    return "cannot reach the kernel-bridge daemon: no control socket at " + path +
           ". Is `kernel-bridge serve` running? Give its socket with --socket PATH or "
           "KERNEL_BRIDGE_SOCKET (the [api] unix_socket of its configuration).";
  }
  if (ec == boost::system::errc::connection_refused) {
    return "cannot reach the kernel-bridge daemon: nothing listens on " + path +
           " (a stale socket file). Is `kernel-bridge serve` running? Start it, or give the right "
           "socket with --socket PATH.";
  }
  if (ec == boost::system::errc::permission_denied) {
    return "cannot reach the kernel-bridge daemon: permission denied on " + path +
           ". Your user may not use this socket; ask the operator to grant access (socket "
           "mode/group).";
  }
  return "cannot reach the kernel-bridge daemon on " + path + ": " + why +
         ". Is `kernel-bridge serve` running?";
}

void set_timeouts(int fd, std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

}  // namespace

ControlResponse ControlClient::request(std::string_view method, const std::string& target,
                                       const nlohmann::json* body,
                                       std::chrono::milliseconds timeout) const {
  asio::io_context io;
  asio::local::stream_protocol::socket socket(io);
  boost::system::error_code ec;
  socket.connect(asio::local::stream_protocol::endpoint(socket_path_), ec);
  if (ec) throw ControlUnreachable(unreachable_hint(socket_path_, ec));
  // Blocking socket with kernel timeouts: a hung daemon turns into an error, not a hung CLI.
  set_timeouts(socket.native_handle(), timeout);

  http::request<http::string_body> req;
  req.method(http::string_to_verb(std::string(method)));
  req.target(target);
  req.version(11);
  req.set(http::field::host, "kernel-bridge");
  req.set(http::field::user_agent, "kernel-bridge-cli");
  req.set(http::field::accept, "application/json");
  req.set(http::field::connection, "close");
  if (body) {
    req.set(http::field::content_type, "application/json");
    req.body() = body->dump();
  }
  req.prepare_payload();
  http::write(socket, req, ec);
  if (ec) {
    throw ControlUnreachable("the kernel-bridge daemon on " + socket_path_ +
                             " closed the connection while we sent a request (" + ec.message() +
                             "); is it shutting down?");
  }
  boost::beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(16 * 1024 * 1024);
  http::read(socket, buffer, parser, ec);
  if (ec) {
    const bool timed_out = ec == boost::system::errc::resource_unavailable_try_again ||
                           ec == boost::system::errc::operation_would_block;
    throw ControlUnreachable(timed_out ? "the kernel-bridge daemon on " + socket_path_ +
                                             " did not answer within " +
                                             std::to_string(timeout.count() / 1000) +
                                             " s; is it overloaded or stuck? (see its log)"
                                       : "the kernel-bridge daemon on " + socket_path_ +
                                             " ended the connection without a "
                                             "complete answer (" +
                                             ec.message() + "); is it shutting down?");
  }
  auto res = parser.release();
  ControlResponse out;
  out.status = static_cast<int>(res.result_int());
  out.raw = std::move(res.body());
  if (!out.raw.empty()) {
    out.body = nlohmann::json::parse(out.raw, nullptr, false);
    if (out.body.is_discarded()) out.body = nullptr;
  }
  return out;
}

std::string url_segment(std::string_view text) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  return out;
}

}  // namespace kb::bridge
