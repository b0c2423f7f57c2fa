#pragma once
// ControlApi: the bridge's HTTP/JSON control API (docs/control-api.md) on a Unix socket (identity =
// the peer's uid via SO_PEERCRED) and optionally TCP (bearer tokens from api.tokens_file). It
// authenticates, parses and validates requests, enforces ownership, and calls the KernelService.
// Construct, start() and stop() on the io_context thread; everything runs on that thread except
// uid → user-name lookups, which go to a private helper thread because NSS may block.
#include <sys/types.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "auth/credentials_store.hpp"
#include "bridge/api_forms.hpp"  // the JSON forms, e.g. format_time_utc and parse_time_utc
#include "bridge/config.hpp"
#include "bridge/kernel_service.hpp"
#include "bridge/metrics.hpp"

namespace kb::bridge {

using HttpRequest = boost::beast::http::request<boost::beast::http::string_body>;
using HttpResponse = boost::beast::http::response<boost::beast::http::string_body>;

// What the connection says about its caller, before the request's own headers.
struct Peer {
  enum class Transport { unix_socket, tcp };
  Transport transport = Transport::unix_socket;
  std::optional<uid_t> uid;              // unix_socket: from SO_PEERCRED
  std::optional<std::string> unix_user;  // unix_socket: uid's name, if it has one
  std::string remote;                    // tcp: "address:port"; for logs
};

class ControlApi {
 public:
  // `config`, `kernels`, `credentials` and `metrics` must outlive every handler of this API that
  // the io_context may still run (i.e. destroy them after the io_context has stopped).
  ControlApi(boost::asio::io_context& io, const BridgeConfig& config, KernelService& kernels,
             auth::CredentialsStore& credentials, BridgeMetrics& metrics);
  ~ControlApi();
  ControlApi(const ControlApi&) = delete;
  ControlApi& operator=(const ControlApi&) = delete;

  // Loads the tokens file (ConfigError) and binds the listeners (std::runtime_error saying what to
  // do: e.g. another bridge already listens on the socket, or the address is in use).
  void start();
  // Closes the listeners and every connection, removes the socket file. Idempotent.
  void stop();
  // Reads api.tokens_file again (serve does it on SIGHUP), so that an operator can add or revoke a
  // token without restarting the daemon and its kernels. On any error the tokens in use stay, and
  // the returned text says what is wrong ("file:line: …"); empty on success or without a file.
  std::string reload_tokens();

  // The bound TCP endpoint (the real port when the configuration asked for port 0).
  std::optional<boost::asio::ip::tcp::endpoint> tcp_endpoint() const;

  // Routes one request as if it arrived from `peer`; `done` is called exactly once, on the
  // io_context thread, possibly inline. Used by the listeners (and usable by tests).
  void handle(const Peer& peer, HttpRequest request, std::function<void(HttpResponse)> done);

  struct Impl;  // implementation detail (bridge/control_api_impl.hpp, for the API's own .cpp files)

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace kb::bridge
