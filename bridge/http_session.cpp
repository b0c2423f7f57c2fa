// The control API's HTTP side: the Unix and TCP listeners, one Session per connection (header and
// body timeouts, keep-alive, the connection limits), who is calling (peer uid or bearer token), and
// the request entry that answers every request exactly once, with a 500 if a handler throws.
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cctype>
#include <chrono>
#include <set>

#include "bridge/control_api_impl.hpp"
#include "common/text.hpp"

namespace kb::bridge {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;

constexpr std::size_t kHeaderLimit = 16 * 1024;
constexpr auto kUserCacheTtl = std::chrono::seconds(60);

std::string percent_decode(std::string_view in, bool* ok) {
  std::string out;
  *ok = true;
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '%') {
      if (i + 2 >= in.size() || !std::isxdigit(static_cast<unsigned char>(in[i + 1])) ||
          !std::isxdigit(static_cast<unsigned char>(in[i + 2]))) {
        *ok = false;
        return {};
      }
      out += static_cast<char>(std::stoi(std::string(in.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += in[i];
    }
  }
  return out;
}

}  // namespace

Target parse_target(std::string_view target) {
  Target t;
  std::string_view path = target, query;
  if (auto q = target.find('?'); q != std::string_view::npos) {
    path = target.substr(0, q);
    query = target.substr(q + 1);
  }
  std::size_t pos = 0;
  while (pos < path.size()) {
    if (path[pos] == '/') {
      ++pos;
      continue;
    }
    auto end = path.find('/', pos);
    if (end == std::string_view::npos) end = path.size();
    bool ok = true;
    t.segments.push_back(percent_decode(path.substr(pos, end - pos), &ok));
    t.ok = t.ok && ok;
    pos = end;
  }
  while (!query.empty()) {
    auto amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (pair.empty()) continue;
    auto eq = pair.find('=');
    bool ok1 = true, ok2 = true;
    std::string key = percent_decode(pair.substr(0, eq), &ok1);
    std::string value =
        eq == std::string_view::npos ? "" : percent_decode(pair.substr(eq + 1), &ok2);
    t.ok = t.ok && ok1 && ok2;
    t.query[key] = value;
  }
  return t;
}

// User names as they appear in URLs and headers: what POSIX and common directory services allow.
bool valid_user_name(std::string_view name) {
  if (name.empty() || name.size() > 256) return false;
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-' &&
        c != '@' && c != '$') {
      return false;
    }
  }
  return true;
}

namespace {

// One connection: reads requests, hands them to the router, writes responses; keep-alive. Its
// slot in the connection limits is released when it is destroyed.
template <class Protocol>
class Session : public SessionBase, public std::enable_shared_from_this<Session<Protocol>> {
 public:
  using Stream = beast::basic_stream<Protocol>;

  Session(std::shared_ptr<ControlApi::Impl> api, typename Protocol::socket socket, Peer peer,
          std::uint64_t id)
      : api_(std::move(api)), stream_(std::move(socket)), peer_(std::move(peer)), id_(id) {}
  ~Session() override { api_->limits.release(id_); }

  void start() { read(); }

  void close() override {
    beast::error_code ignored;
    stream_.socket().shutdown(net::socket_base::shutdown_both, ignored);
    stream_.close();
  }

 private:
  // The header must arrive within api.header_timeout on a new connection (api.idle_timeout
  // between keep-alive requests); the body then within api.read_timeout. A client that opens a
  // connection and says nothing holds its slot for seconds, not minutes.
  void read() {
    parser_.emplace();
    parser_->body_limit(api_->config.api.max_body);
    parser_->header_limit(kHeaderLimit);
    stream_.expires_after(first_ ? api_->config.api.header_timeout : api_->config.api.idle_timeout);
    http::async_read_header(
        stream_, buffer_, *parser_,
        [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
          if (ec || self->parser_->is_done()) return self->on_read(ec);
          self->stream_.expires_after(self->api_->config.api.read_timeout);
          http::async_read(self->stream_, self->buffer_, *self->parser_,
                           [self](beast::error_code ec2, std::size_t) { self->on_read(ec2); });
        });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::end_of_stream || ec == net::error::eof ||
        ec == net::error::operation_aborted || ec == net::error::connection_reset) {
      return close();
    }
    if (ec == beast::error::timeout) {
      spdlog::debug("api: {} connection timed out waiting for a request", describe());
      return close();
    }
    if (ec == http::error::body_limit) {
      return fail(
          http::status::payload_too_large,
          "request body larger than api.max_body (" + format_size(api_->config.api.max_body) + ")");
    }
    if (ec == http::error::header_limit) {
      return fail(http::status::request_header_fields_too_large, "request headers larger than 16K");
    }
    if (ec) {
      if (ec.category() == http::make_error_code(http::error::bad_target).category()) {
        return fail(http::status::bad_request, "malformed HTTP request: " + ec.message());
      }
      spdlog::debug("api: {} read failed: {}", describe(), ec.message());
      return close();
    }
    stream_.expires_never();  // the service may take its time; the response write re-arms
    api_->handle(
        peer_, parser_->release(),
        [self = this->shared_from_this()](HttpResponse response) {
          self->write(std::move(response));
        },
        id_);
  }

  void fail(http::status status, const std::string& message) {
    HttpResponse response{status, 11};
    response.set(http::field::content_type, "application/json");
    response.body() = dump_json(json{{"error", message}}) + "\n";
    response.keep_alive(false);
    response.prepare_payload();
    spdlog::info("api: {} {} {}", describe(), static_cast<int>(status), message);
    write(std::move(response));
  }

  void write(HttpResponse response) {
    response_ = std::make_shared<HttpResponse>(std::move(response));
    stream_.expires_after(api_->config.api.read_timeout);
    http::async_write(stream_, *response_,
                      [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
                        const bool keep = self->response_->keep_alive();
                        self->response_.reset();
                        if (ec || !keep || self->api_->stopped) return self->close();
                        self->first_ = false;
                        self->read();
                      });
  }

  std::string describe() const {
    if (peer_.transport == Peer::Transport::tcp) return "tcp " + peer_.remote;
    return "unix uid " + (peer_.uid ? std::to_string(*peer_.uid) : std::string("?"));
  }

  std::shared_ptr<ControlApi::Impl> api_;
  Stream stream_;
  Peer peer_;
  std::uint64_t id_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<HttpResponse> response_;
  bool first_ = true;
};

// Tells a connection the limits turned away why, in one small HTTP answer, without waiting: the
// kernel's socket buffer takes it, or the client does not get it (it was flooding us anyway).
template <class Socket>
void refuse_connection(Socket& socket, const std::string& why) {
  const std::string body = dump_json(json{{"error", why}}) + "\n";
  const std::string answer =
      "HTTP/1.1 503 Service Unavailable\r\nServer: kernel-bridge/" KB_VERSION
      "\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 5\r\n"
      "Content-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  [[maybe_unused]] ssize_t sent =
      ::send(socket.native_handle(), answer.data(), answer.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  beast::error_code ignored;
  socket.shutdown(net::socket_base::shutdown_both, ignored);
  socket.close(ignored);
}

template <class Protocol>
void start_session(const std::shared_ptr<ControlApi::Impl>& api, std::uint64_t id,
                   typename Protocol::socket socket, Peer peer) {
  // Forget sessions that have ended (their limits slot went with them).
  for (auto it = api->sessions.begin(); it != api->sessions.end();) {
    it = it->second.expired() ? api->sessions.erase(it) : std::next(it);
  }
  auto session = std::make_shared<Session<Protocol>>(api, std::move(socket), std::move(peer), id);
  api->sessions.emplace(id, session);
  session->start();
}

}  // namespace

void ControlApi::Impl::log_refusal(const std::string& why) {
  metrics.api_connections_refused.unlabelled().inc();
  const auto now = std::chrono::steady_clock::now();
  if (now - last_refusal_log < std::chrono::seconds(10)) {
    ++refusals_unlogged;
    return;
  }
  if (refusals_unlogged > 0) {
    spdlog::warn("api: connection refused: {} ({} more refused or dropped in the last 10 s)", why,
                 refusals_unlogged);
  } else {
    spdlog::warn("api: connection refused: {}", why);
  }
  last_refusal_log = now;
  refusals_unlogged = 0;
}

void ControlApi::Impl::resolve_user(uid_t uid,
                                    std::function<void(std::optional<std::string>)> done) {
  auto cached = user_cache.find(uid);
  if (cached != user_cache.end() &&
      std::chrono::steady_clock::now() - cached->second.second < kUserCacheTtl) {
    return done(cached->second.first);
  }
  net::post(*lookups, [self = shared_from_this(), uid, done = std::move(done)]() mutable {
    auto name = auth::user_name_of_uid(uid);
    net::post(self->io, [self, uid, name, done = std::move(done)] {
      self->user_cache[uid] = {name, std::chrono::steady_clock::now()};
      done(name);
    });
  });
}

void ControlApi::Impl::accept_unix() {
  unix_acceptor->async_accept([self = shared_from_this()](
                                  beast::error_code ec,
                                  net::local::stream_protocol::socket socket) {
    if (ec == net::error::operation_aborted || self->stopped) return;
    if (ec) {
      spdlog::warn("api: accept on {} failed: {}", self->socket_path, ec.message());
      // EMFILE and friends: try again shortly instead of spinning.
      auto timer = std::make_shared<net::steady_timer>(self->io, std::chrono::milliseconds(200));
      timer->async_wait([self, timer](beast::error_code e) {
        if (!e && !self->stopped) self->accept_unix();
      });
      return;
    }
    Peer peer;
    peer.transport = Peer::Transport::unix_socket;
    peer.uid = auth::peer_uid(socket.native_handle());
    if (!peer.uid) {
      spdlog::warn("api: cannot read the peer credentials of a Unix connection; closing it");
    } else {
      auto holder = std::make_shared<net::local::stream_protocol::socket>(std::move(socket));
      self->resolve_user(*peer.uid, [self, holder, peer](std::optional<std::string> name) mutable {
        if (self->stopped) return;
        peer.unix_user = std::move(name);
        const bool admin = peer.unix_user && self->is_admin_user(*peer.unix_user);
        const std::uint64_t id = ++self->next_session;
        if (auto refusal = self->limits.admit_unix(id, *peer.uid, admin)) {
          self->log_refusal(*refusal);
          return refuse_connection(*holder, *refusal);
        }
        start_session<net::local::stream_protocol>(self, id, std::move(*holder), std::move(peer));
      });
    }
    self->accept_unix();
  });
}

void ControlApi::Impl::accept_tcp() {
  tcp_acceptor->async_accept([self = shared_from_this()](beast::error_code ec,
                                                         net::ip::tcp::socket socket) {
    if (ec == net::error::operation_aborted || self->stopped) return;
    if (ec) {
      spdlog::warn("api: accept on tcp failed: {}", ec.message());
      auto timer = std::make_shared<net::steady_timer>(self->io, std::chrono::milliseconds(200));
      timer->async_wait([self, timer](beast::error_code e) {
        if (!e && !self->stopped) self->accept_tcp();
      });
      return;
    }
    Peer peer;
    peer.transport = Peer::Transport::tcp;
    beast::error_code ignored;
    auto remote = socket.remote_endpoint(ignored);
    peer.remote = remote.address().to_string() + ":" + std::to_string(remote.port());
    socket.set_option(net::ip::tcp::no_delay(true), ignored);
    const std::uint64_t id = ++self->next_session;
    bool admitted = true;
    for (std::uint64_t drop : self->limits.admit_tcp(id)) {
      if (drop == id) {
        admitted = false;
        self->log_refusal("the TCP listener is full (api.max_connections)");
        refuse_connection(socket,
                          "the control API's TCP listener has api.max_connections "
                          "connections open; try again later");
        continue;
      }
      // The oldest connection that has not shown a token yet makes room for this one.
      self->log_refusal("dropped the oldest of " +
                        std::to_string(self->limits.settings().max_unauthenticated) +
                        " TCP connections without a valid token yet");
      if (auto it = self->sessions.find(drop); it != self->sessions.end()) {
        if (auto session = it->second.lock()) session->close();
      }
    }
    if (admitted) start_session<net::ip::tcp>(self, id, std::move(socket), std::move(peer));
    self->accept_tcp();
  });
}

namespace {

// X-Kernel-Bridge-User: an admin (e.g. the hub) acts for another user and sees only their kernels.
std::optional<ApiError> act_for(const HttpRequest& request, Caller& caller) {
  const std::string acting(request["X-Kernel-Bridge-User"]);
  if (!acting.empty() && std::string(acting) != caller.user) {
    if (!caller.admin) {
      return ApiError{http::status::forbidden,
                      "only an admin may act for another user (X-Kernel-Bridge-User: " +
                          printable(acting, kQuoteLimit) + ")",
                      "X-Kernel-Bridge-User",
                      {}};
    }
    if (!valid_user_name(acting)) {
      return ApiError{http::status::bad_request,
                      "X-Kernel-Bridge-User is not a valid user name",
                      "X-Kernel-Bridge-User",
                      {}};
    }
    caller.origin += " acting for " + std::string(acting);
    caller.user = std::string(acting);
    caller.sees_all = false;
  } else {
    // An admin acting as itself is the operator: it sees every kernel.
    caller.sees_all = caller.admin && acting.empty();
  }
  return std::nullopt;
}

}  // namespace

std::variant<Caller, ApiError> ControlApi::Impl::authenticate(const Peer& peer,
                                                              const HttpRequest& request,
                                                              std::uint64_t session) {
  Caller caller;
  if (peer.transport == Peer::Transport::unix_socket) {
    if (!peer.unix_user) {
      return ApiError{
          http::status::forbidden,
          "your uid " + (peer.uid ? std::to_string(*peer.uid) : std::string("?")) +
              " has no user name on the bridge's host; the bridge identifies callers by user name",
          {},
          {}};
    }
    caller.user = *peer.unix_user;
    const auto& admins = config.api.admin_users;
    caller.admin = std::find(admins.begin(), admins.end(), caller.user) != admins.end();
    caller.origin = "unix uid " + std::to_string(*peer.uid);
  } else {
    auto auth = request[http::field::authorization];
    if (auth.empty()) {
      return ApiError{http::status::unauthorized,
                      "missing Authorization: Bearer <token> header",
                      "Authorization",
                      {}};
    }
    constexpr beast::string_view kBearer = "Bearer ";
    if (auth.size() <= kBearer.size() || !beast::iequals(auth.substr(0, kBearer.size()), kBearer)) {
      return ApiError{http::status::unauthorized,
                      "the Authorization header must be \"Bearer <token>\"",
                      "Authorization",
                      {}};
    }
    std::string_view token(auth.data() + kBearer.size(), auth.size() - kBearer.size());
    while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
    auto identity = tokens ? tokens->lookup(token) : std::nullopt;
    if (!identity) {
      return ApiError{http::status::unauthorized, "invalid API token", "Authorization", {}};
    }
    caller.user = identity->user;
    caller.admin = identity->admin;
    caller.origin = "tcp " + peer.remote + " token of " + identity->user;
    // A valid token moves the connection out of the small unauthenticated budget into its user's.
    if (session != 0 && !limits.is_authenticated(session)) {
      if (auto refusal = limits.authenticated_tcp(session, identity->user, identity->admin)) {
        log_refusal(*refusal);
        return ApiError{
            http::status::service_unavailable, *refusal, {}, "api.max_connections_per_user"};
      }
    }
  }
  if (auto e = act_for(request, caller)) return *e;
  return caller;
}

namespace {

// What the log line and the metric say about one request.
struct RequestLabels {
  std::string method;        // as sent
  std::string method_label;  // a method HTTP defines, or "(other)"
  std::string route_label;   // the route template ("/v1/kernels/{id}"), or "(other)"
  std::string who;           // the caller as the connection shows it
  std::string path;          // the path only, quoted and cut
};

// The route template (ids replaced) keeps the metric's label set bounded.
std::string route_label_of(const Target& target) {
  std::string route_label = "/";
  for (std::size_t i = 0; i < target.segments.size(); ++i) {
    const bool variable = (i == 2 && target.segments[0] == "v1" &&
                           (target.segments[1] == "kernels" || target.segments[1] == "users"));
    route_label +=
        (i ? "/" : "") +
        (variable ? (target.segments[1] == "kernels" ? std::string("{id}") : std::string("{user}"))
                  : target.segments[i]);
  }
  // Only routes that exist get their own label; anything else a client sends shares one.
  static const std::set<std::string> kRoutes = {"/v1/health",
                                                "/metrics",
                                                "/v1/kernels",
                                                "/v1/kernels/{id}",
                                                "/v1/kernels/{id}/interrupt",
                                                "/v1/kernels/{id}/restart",
                                                "/v1/users/{user}/credentials"};
  if (!kRoutes.count(route_label)) route_label = "(other)";
  return route_label;
}

RequestLabels label_request(const Peer& peer, const HttpRequest& request, const Target& target) {
  RequestLabels labels;
  labels.method = std::string(request.method_string());
  labels.route_label = route_label_of(target);
  static const std::set<std::string> kMethods = {"GET",  "POST",    "PUT",  "DELETE",
                                                 "HEAD", "OPTIONS", "PATCH"};
  labels.method_label = kMethods.count(labels.method) ? labels.method : std::string("(other)");
  labels.who = peer.transport == Peer::Transport::tcp
                   ? "tcp " + peer.remote
                   : (peer.unix_user ? *peer.unix_user : std::string("uid ?"));
  // The path only (query strings are not secret here, but keep lines short and uniform), quoted
  // and cut: a client decides what it holds.
  labels.path = printable(std::string_view(request.target().data(), request.target().size())
                              .substr(0, request.target().find('?')),
                          kQuoteLimit);
  return labels;
}

// The response a route's answer makes: JSON unless the route set a Content-Type (then `body` is
// the text as is); Connection: close from a route (e.g. a refused connection) ends the keep-alive.
HttpResponse make_response(http::status status, const json& body, const http::fields& extra,
                           unsigned version, bool keep_alive) {
  HttpResponse response{status, version};
  response.set(http::field::server, "kernel-bridge/" KB_VERSION);
  for (const auto& f : extra) response.set(f.name_string(), f.value());
  if (response[http::field::content_type].empty()) {
    response.set(http::field::content_type, "application/json");
    if (status != http::status::no_content) response.body() = dump_json(body) + "\n";
  } else {
    response.body() = body.get<std::string>();
  }
  response.keep_alive(keep_alive && !beast::iequals(response[http::field::connection], "close"));
  response.prepare_payload();
  return response;
}

}  // namespace

void ControlApi::Impl::handle(const Peer& peer, HttpRequest request,
                              std::function<void(HttpResponse)> done, std::uint64_t session) {
  const auto t0 = std::chrono::steady_clock::now();
  const unsigned version = request.version();
  const bool keep_alive = request.keep_alive();
  Target target = parse_target(std::string_view(request.target().data(), request.target().size()));
  const auto labels = std::make_shared<const RequestLabels>(label_request(peer, request, target));
  auto self = shared_from_this();
  // Called exactly once per request; a second call (a handler that failed after replying) is
  // logged and ignored.
  auto replied = std::make_shared<bool>(false);
  Reply reply = [self, done = std::move(done), version, keep_alive, labels, t0, replied](
                    http::status status, json body, http::fields extra) {
    if (*replied) {
      spdlog::error("api: {} {} {}: a second answer ({}) was dropped", labels->who, labels->method,
                    labels->path, static_cast<int>(status));
      return;
    }
    *replied = true;
    HttpResponse response = make_response(status, body, extra, version, keep_alive);
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    spdlog::info("api: {} {} {} -> {} ({} ms)", labels->who, labels->method, labels->path,
                 static_cast<int>(status), ms);
    self->metrics.api_requests
        .with({labels->method_label, labels->route_label, std::to_string(static_cast<int>(status))})
        .inc();
    done(std::move(response));
  };
  if (!target.ok) {
    return reply(
        http::status::bad_request,
        error_body({http::status::bad_request, "malformed percent-encoding in the URL", {}, {}}),
        {});
  }
  // No exception from parsing, validating or serving one request may leave here: the daemon
  // serves every user's kernels. The request gets a 500 and the operator a log line.
  try {
    route(peer, request, target, session, reply);
  } catch (const std::exception& e) {
    self->metrics.api_internal_errors.unlabelled().inc();
    spdlog::error("api: {} {} {}: internal error while handling the request: {}", labels->who,
                  labels->method, labels->path, printable(e.what(), 400));
    if (!*replied) {
      reply(http::status::internal_server_error,
            error_body({http::status::internal_server_error,
                        "internal error while handling the request (the bridge's log has the "
                        "details); the bridge and its kernels go on",
                        {},
                        {}}),
            {});
    }
  }
}

}  // namespace kb::bridge
