#pragma once
// ControlApi::Impl, the control API's shared state, for the API's own .cpp files only: the facade
// (control_api.cpp), connections and the request entry (http_session.cpp), the routes
// (api_routes.cpp, api_create_kernel.cpp). Everything runs on the io_context thread.
#include <sys/types.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/http/fields.hpp>
#include <boost/beast/http/status.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "auth/api_tokens.hpp"
#include "bridge/api_forms.hpp"
#include "bridge/connection_limits.hpp"
#include "bridge/control_api.hpp"

namespace kb::bridge {

// How a route answers: status, JSON body (or, with a Content-Type in the fields, a string holding
// the body as is) and extra header fields. Called exactly once per request.
using Reply =
    std::function<void(boost::beast::http::status, nlohmann::json, boost::beast::http::fields)>;

// Answers with an error's status and its JSON body (api_forms.hpp's error_body).
inline void reply_error(const Reply& reply, const ApiError& e,
                        boost::beast::http::fields extra = {}) {
  reply(e.status, error_body(e), std::move(extra));
}

// A parsed request target: path segments (percent-decoded) and query parameters.
struct Target {
  std::vector<std::string> segments;
  std::map<std::string, std::string> query;
  bool ok = true;  // false: malformed percent-encoding somewhere
};
Target parse_target(std::string_view target);

// User names as they appear in URLs and headers: what POSIX and common directory services allow.
bool valid_user_name(std::string_view name);

// A connection, as ControlApi::stop() and the TCP limits (dropping the oldest) close it.
class SessionBase {
 public:
  virtual ~SessionBase() = default;
  virtual void close() = 0;
};

struct ControlApi::Impl : std::enable_shared_from_this<ControlApi::Impl> {
  Impl(boost::asio::io_context& io_, const BridgeConfig& config_, KernelService& kernels_,
       auth::CredentialsStore& credentials_, BridgeMetrics& metrics_)
      : io(io_),
        config(config_),
        kernels(kernels_),
        credentials(credentials_),
        metrics(metrics_),
        limits(ConnectionLimits::Settings{
            config_.api.max_connections, config_.api.max_connections_per_user,
            std::min<std::size_t>(64, config_.api.max_connections / 8),
            std::min<std::size_t>(64, config_.api.max_connections)}) {}

  boost::asio::io_context& io;
  const BridgeConfig& config;
  KernelService& kernels;
  auth::CredentialsStore& credentials;
  BridgeMetrics& metrics;
  ConnectionLimits limits;
  std::optional<auth::ApiTokens> tokens;
  std::optional<boost::asio::local::stream_protocol::acceptor> unix_acceptor;
  std::optional<boost::asio::ip::tcp::acceptor> tcp_acceptor;
  std::string socket_path;  // set once we created it, so stop() removes only our own file
  std::map<std::uint64_t, std::weak_ptr<SessionBase>> sessions;
  std::uint64_t next_session = 0;
  std::map<std::uint64_t, std::shared_ptr<boost::asio::steady_timer>> waits;  // long polls
  std::uint64_t next_wait = 0;
  std::unique_ptr<boost::asio::thread_pool> lookups;  // getpwuid_r off the event loop
  std::map<uid_t, std::pair<std::optional<std::string>, std::chrono::steady_clock::time_point>>
      user_cache;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_refusal_log{};
  std::uint64_t refusals_unlogged = 0;
  bool stopped = false;

  bool is_admin_user(const std::string& user) const {
    const auto& admins = config.api.admin_users;
    return std::find(admins.begin(), admins.end(), user) != admins.end();
  }
  bool visible(const Caller& caller, const KernelView& v) const {
    return caller.sees_all || v.owner == caller.user;
  }

  // --- http_session.cpp: listeners, connections, the request entry, who is calling.
  void accept_unix();
  void accept_tcp();
  void resolve_user(uid_t uid, std::function<void(std::optional<std::string>)> done);
  // A connection refused or dropped by the limits: one warning per 10 s at most, with a count.
  void log_refusal(const std::string& why);
  // `session` is the connection's id (0 for requests that come from no connection, e.g. tests):
  // the first authenticated request moves a TCP connection into its token user's budget.
  void handle(const Peer& peer, HttpRequest request, std::function<void(HttpResponse)> done,
              std::uint64_t session = 0);
  std::variant<Caller, ApiError> authenticate(const Peer& peer, const HttpRequest& request,
                                              std::uint64_t session);

  // --- api_routes.cpp: one handler per route.
  void route(const Peer& peer, const HttpRequest& request, const Target& target,
             std::uint64_t session, Reply reply);
  nlohmann::json health_json() const;
  void list_kernels(const Caller& caller, const Reply& reply);
  void create_kernel(const Caller& caller, const std::string& body, Reply reply);
  void kernel_route(const Caller& caller, const HttpRequest& request, const Target& target,
                    const Reply& reply);
  void get_kernel(const Caller& caller, const std::string& id, const KernelView& view,
                  const Target& target, const Reply& reply);
  void wait_for_change(const std::string& id, std::uint64_t after,
                       std::chrono::milliseconds timeout, Caller caller, Reply reply);
  void credentials_route(const Caller& caller, const HttpRequest& request, const std::string& user,
                         const Reply& reply);

  // --- api_sites.cpp: GET /v1/sites, GET /v1/sites/{site}/options.
  void list_sites(const Reply& reply) const;
  void site_options(const Caller& caller, const std::string& site, Reply reply);

  // --- api_create_kernel.cpp: POST /v1/kernels, step by step.
  std::optional<ApiError> read_kernel_request(const nlohmann::json& body, KernelRequest& request,
                                              const SiteConfig*& site) const;
  // Applies the site's defaults, then checks the site's limits and max_kernels_per_user.
  std::optional<ApiError> validate_kernel_request(const Caller& caller, const SiteConfig& site,
                                                  KernelRequest& request) const;
  void submit_kernel(const Caller& caller, KernelRequest request, Reply reply);
};

}  // namespace kb::bridge
