// The control API's routes (docs/control-api.md): route() checks what every request needs (caller,
// body type, query) and hands it to one small handler per route; GET /v1/kernels/{id}?wait= long
// polls live here too. POST /v1/kernels is in api_create_kernel.cpp.
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/verb.hpp>
#include <chrono>

#include "bridge/control_api_impl.hpp"
#include "common/text.hpp"

namespace kb::bridge {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;

void method_not_allowed(const Reply& reply, const HttpRequest& request, const char* allow) {
  http::fields extra;
  extra.set(http::field::allow, allow);
  reply_error(
      reply,
      {http::status::method_not_allowed,
       std::string(request.method_string()) + " is not allowed here (allowed: " + allow + ")",
       {},
       {}},
      std::move(extra));
}

void no_such_route(const Reply& reply, const HttpRequest& request) {
  reply_error(reply,
              {http::status::not_found,
               "no such route: " + std::string(request.method_string()) + " " +
                   printable(std::string_view(request.target().data(), request.target().size())
                                 .substr(0, request.target().find('?')),
                             kQuoteLimit) +
                   " (see docs/control-api.md)",
               {},
               {}});
}

// Another user's kernel is "not found" too: its existence is not revealed.
ApiError no_kernel(const std::string& id) {
  return {http::status::not_found, "no kernel " + printable(id, kQuoteLimit), "id", {}};
}

// A caller authenticate() turned away: 401 says how to authenticate, 503 (the connection limits)
// closes the connection and says when to come back.
void refuse_caller(const Reply& reply, const ApiError& e) {
  http::fields extra;
  if (e.status == http::status::unauthorized)
    extra.set(http::field::www_authenticate, "Bearer realm=\"kernel-bridge\"");
  if (e.status == http::status::service_unavailable) {
    extra.set(http::field::connection, "close");
    extra.set(http::field::retry_after, "5");
  }
  reply_error(reply, e, std::move(extra));
}

// application/json, in any case, with or without parameters ("; charset=utf-8"): media types are
// case-insensitive (RFC 9110 8.3.1), and application/jsonx is another type.
bool is_json_media_type(beast::string_view type) {
  if (type.empty()) return true;  // no Content-Type: the body is taken as JSON
  const auto semicolon = type.find(';');
  beast::string_view essence = type.substr(0, semicolon);
  while (!essence.empty() && (essence.back() == ' ' || essence.back() == '\t'))
    essence.remove_suffix(1);
  while (!essence.empty() && (essence.front() == ' ' || essence.front() == '\t'))
    essence.remove_prefix(1);
  return beast::iequals(essence, "application/json");
}

// What every authenticated request must get right whatever its route: a JSON body, and no query
// parameter the route does not know (a mistake worth hearing about, e.g. ?wiat=30s).
std::optional<ApiError> check_body_and_query(const HttpRequest& request, const Target& target) {
  const auto& seg = target.segments;
  const http::verb verb = request.method();
  const bool has_body_method = verb == http::verb::post || verb == http::verb::put;
  if (has_body_method && !request.body().empty() &&
      !is_json_media_type(request[http::field::content_type])) {
    return ApiError{http::status::unsupported_media_type,
                    "send the body as application/json",
                    "Content-Type",
                    {}};
  }
  const bool kernel_route = seg.size() == 3 && seg[0] == "v1" && seg[1] == "kernels";
  for (const auto& [key, value] : target.query) {
    if (kernel_route && verb == http::verb::get && (key == "wait" || key == "after")) continue;
    return ApiError{http::status::bad_request,
                    "unknown query parameter '" + printable(key, kQuoteLimit) + "'" +
                        (kernel_route ? " (GET /v1/kernels/{id} takes wait and after)"
                                      : " (this route takes none)"),
                    printable(key, kQuoteLimit),
                    {}};
  }
  return std::nullopt;
}

// A kernel version number (decimal digits only, fits in 64 bits).
std::optional<std::uint64_t> parse_version(const std::string& text) {
  if (text.empty() || text.size() > 19) return std::nullopt;
  std::uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return value;
}

// GET /v1/kernels/{id}?wait=30s&after=4: answer when the kernel's version passes `after` (by
// default the version it has now), or after `wait`. Without wait the answer comes at once.
struct LongPoll {
  std::optional<std::chrono::seconds> wait;
  std::uint64_t after = 0;
};

std::variant<LongPoll, ApiError> parse_long_poll(const Target& target, std::uint64_t version) {
  LongPoll poll;
  auto wait = target.query.find("wait");
  if (wait != target.query.end()) {
    std::string error_text;
    poll.wait = parse_duration(wait->second, &error_text);
    if (!poll.wait)
      return ApiError{http::status::bad_request, "wait: " + printable(error_text), "wait", {}};
  }
  poll.after = version;
  if (auto a = target.query.find("after"); a != target.query.end()) {
    const auto parsed = parse_version(a->second);
    if (!parsed)
      return ApiError{
          http::status::bad_request, "after must be a kernel version number", "after", {}};
    if (!poll.wait)
      return ApiError{http::status::bad_request,
                      "after only means something with wait (e.g. ?wait=30s&after=4)",
                      "after",
                      {}};
    poll.after = *parsed;
  }
  return poll;
}

// What interrupt, restart and DELETE answer once the service took the action: 202 with the
// kernel as it is now.
ActionCallback action_done(KernelService& kernels, Reply reply, std::string id) {
  return [&kernels, reply, id](std::optional<ServiceError> err) {
    if (err)
      return reply(from_service_error(*err).status, error_body(from_service_error(*err)), {});
    auto now = kernels.get(id);
    reply(http::status::accepted, now ? kernel_json(*now) : json{{"id", id}}, {});
  };
}

}  // namespace

void ControlApi::Impl::route(const Peer& peer, const HttpRequest& request, const Target& target,
                             std::uint64_t session, Reply reply) {
  const auto& seg = target.segments;
  // Open to everyone who can connect: liveness for monitors.
  if (seg == std::vector<std::string>{"v1", "health"}) {
    if (request.method() != http::verb::get) return method_not_allowed(reply, request, "GET");
    return reply(http::status::ok, health_json(), {});
  }
  auto authenticated = authenticate(peer, request, session);
  if (auto* e = std::get_if<ApiError>(&authenticated)) return refuse_caller(reply, *e);
  const Caller caller = std::get<Caller>(authenticated);
  if (auto e = check_body_and_query(request, target)) return reply_error(reply, *e);

  if (seg == std::vector<std::string>{"metrics"}) {
    if (request.method() != http::verb::get) return method_not_allowed(reply, request, "GET");
    http::fields extra;
    extra.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    return reply(http::status::ok, json(metrics.registry.render()), std::move(extra));
  }
  if (seg.size() == 2 && seg[0] == "v1" && seg[1] == "kernels") {
    if (request.method() == http::verb::get) return list_kernels(caller, reply);
    if (request.method() == http::verb::post) return create_kernel(caller, request.body(), reply);
    return method_not_allowed(reply, request, "GET, POST");
  }
  if (seg.size() >= 3 && seg[0] == "v1" && seg[1] == "kernels")
    return kernel_route(caller, request, target, reply);
  if (seg.size() == 4 && seg[0] == "v1" && seg[1] == "users" && seg[3] == "credentials")
    return credentials_route(caller, request, seg[2], reply);
  if (seg.size() >= 2 && seg[0] == "v1" && seg[1] == "sites") {
    if (request.method() != http::verb::get) return method_not_allowed(reply, request, "GET");
    if (seg.size() == 2) return list_sites(reply);
    if (seg.size() == 4 && seg[3] == "options") return site_options(caller, seg[2], reply);
  }
  no_such_route(reply, request);
}

json ControlApi::Impl::health_json() const {
  json counts = json::object();
  for (auto s : kAllKernelStates) counts[std::string(to_string(s))] = 0;
  for (const auto& v : kernels.list())
    counts[std::string(to_string(v.state))] =
        counts[std::string(to_string(v.state))].get<int>() + 1;
  json checks = json::array();
  bool ok = true;
  for (const auto& c : kernels.health()) {
    ok = ok && c.ok;
    checks.push_back({{"component", c.component}, {"ok", c.ok}, {"detail", c.detail}});
  }
  return json{{"status", ok ? "ok" : "degraded"},
              {"version", KB_VERSION},
              {"uptime_seconds", std::chrono::duration_cast<std::chrono::seconds>(
                                     std::chrono::steady_clock::now() - started)
                                     .count()},
              {"kernels", counts},
              {"checks", checks}};
}

void ControlApi::Impl::list_kernels(const Caller& caller, const Reply& reply) {
  json list = json::array();
  for (const auto& v : kernels.list()) {
    if (visible(caller, v)) list.push_back(kernel_json(v));
  }
  reply(http::status::ok, json{{"kernels", list}}, {});
}

// /v1/kernels/{id} (GET, DELETE) and /v1/kernels/{id}/interrupt|restart (POST).
void ControlApi::Impl::kernel_route(const Caller& caller, const HttpRequest& request,
                                    const Target& target, const Reply& reply) {
  const auto& seg = target.segments;
  const http::verb verb = request.method();
  const std::string& id = seg[2];
  auto view = kernels.get(id);
  const bool found = view && visible(caller, *view);
  if (seg.size() == 3) {
    if (verb == http::verb::get) {
      if (!found) return reply_error(reply, no_kernel(id));
      return get_kernel(caller, id, *view, target, reply);
    }
    if (verb == http::verb::delete_) {
      if (!found) return reply_error(reply, no_kernel(id));
      return kernels.remove(caller, id, action_done(kernels, reply, id));
    }
    return method_not_allowed(reply, request, "GET, DELETE");
  }
  if (seg.size() == 4 && (seg[3] == "interrupt" || seg[3] == "restart")) {
    if (verb != http::verb::post) return method_not_allowed(reply, request, "POST");
    if (!found) return reply_error(reply, no_kernel(id));
    if (seg[3] == "interrupt")
      return kernels.interrupt(caller, id, action_done(kernels, reply, id));
    return kernels.restart(caller, id, action_done(kernels, reply, id));
  }
  no_such_route(reply, request);
}

void ControlApi::Impl::get_kernel(const Caller& caller, const std::string& id,
                                  const KernelView& view, const Target& target,
                                  const Reply& reply) {
  if (view.owner == caller.user) kernels.watched(id);
  auto poll = parse_long_poll(target, view.version);
  if (auto* e = std::get_if<ApiError>(&poll)) return reply_error(reply, *e);
  const LongPoll& asked = std::get<LongPoll>(poll);
  if (!asked.wait) return reply(http::status::ok, kernel_json(view), {});
  const auto limit = std::min<std::chrono::seconds>(*asked.wait, config.api.max_wait);
  wait_for_change(id, asked.after, limit, caller, reply);
}

void ControlApi::Impl::wait_for_change(const std::string& id, std::uint64_t after,
                                       std::chrono::milliseconds timeout, Caller caller,
                                       Reply reply) {
  auto view = kernels.get(id);
  if (!view || !visible(caller, *view)) return reply_error(reply, no_kernel(id));
  if (view->version > after || view->state == KernelState::ended || timeout.count() == 0) {
    return reply(http::status::ok, kernel_json(*view), {});
  }
  struct Wait {
    std::uint64_t listener = 0;
    std::uint64_t key = 0;
    bool done = false;
    Reply reply;
  };
  auto wait = std::make_shared<Wait>();
  wait->reply = std::move(reply);
  auto timer = std::make_shared<net::steady_timer>(io, timeout);
  wait->key = ++next_wait;
  waits.emplace(wait->key, timer);
  auto self = shared_from_this();
  auto finish = [self, wait, timer, id, caller]() {
    if (wait->done) return;
    wait->done = true;
    self->kernels.unsubscribe(wait->listener);
    self->waits.erase(wait->key);
    timer->cancel();
    auto now = self->kernels.get(id);
    if (now && now->owner == caller.user) self->kernels.watched(id);  // the poller is still there
    if (now)
      wait->reply(http::status::ok, kernel_json(*now), {});
    else
      reply_error(wait->reply, no_kernel(id));
  };
  wait->listener = kernels.subscribe([id, after, finish](const KernelView& changed) {
    if (changed.id == id && changed.version > after) finish();
  });
  timer->async_wait([finish](beast::error_code) { finish(); });
}

// /v1/users/{user}/credentials: the hub pushes each user's UNICORE token (PUT), reads its state
// (GET) or removes it (DELETE).
void ControlApi::Impl::credentials_route(const Caller& caller, const HttpRequest& request,
                                         const std::string& user, const Reply& reply) {
  const http::verb verb = request.method();
  if (verb != http::verb::put && verb != http::verb::get && verb != http::verb::delete_) {
    return method_not_allowed(reply, request, "PUT, GET, DELETE");
  }
  if (!valid_user_name(user))
    return reply_error(reply, {http::status::bad_request, "not a valid user name", "user", {}});
  // The real user (not the one acted for) decides: an admin may set anyone's, others only their
  // own.
  if (user != caller.user && !caller.admin) {
    return reply_error(
        reply, {http::status::forbidden, "you may manage only your own credentials", "user", {}});
  }
  if (verb == http::verb::get)
    return reply(http::status::ok, credentials_json(user, credentials.info(user)), {});
  if (verb == http::verb::delete_) {
    credentials.erase(user);
    return reply(http::status::no_content, json(), {});
  }
  // PUT. The body holds a secret: nothing below logs or echoes it.
  auto parsed = parse_credentials(request.body());
  if (auto* e = std::get_if<ApiError>(&parsed)) return reply_error(reply, *e);
  CredentialsUpdate& update = std::get<CredentialsUpdate>(parsed);
  credentials.set(user, std::move(update.token), update.expires_at);
  reply(http::status::ok, credentials_json(user, credentials.info(user)), {});
}

}  // namespace kb::bridge
