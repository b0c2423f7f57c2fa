#include "bridge/control_api.hpp"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "bridge/connection_limits.hpp"
#include "auth/api_tokens.hpp"
#include "common/text.hpp"

namespace kb::bridge {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;

constexpr std::size_t kHeaderLimit = 16 * 1024;
// What a log line or an error message quotes of a request's path, ids and headers.
constexpr std::size_t kQuoteLimit = 96;
constexpr auto kUserCacheTtl = std::chrono::seconds(60);

// An error a request gets back: status, a sentence, and the field / limit at fault.
struct ApiError {
  http::status status;
  std::string message;
  std::string field;
  std::string limit;
};

// Serialises a response body. Text from a request is quoted with printable() before it gets here;
// replacing what is still not UTF-8 keeps a serializer exception from ever ending a session.
std::string dump_json(const json& body) {
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

json error_body(const ApiError& e) {
  json body{{"error", e.message}};
  if (!e.field.empty()) body["field"] = e.field;
  if (!e.limit.empty()) body["limit"] = e.limit;
  return body;
}

ApiError from_service_error(const ServiceError& e) {
  http::status status = http::status::internal_server_error;
  switch (e.kind) {
    case ServiceErrorKind::invalid_request:
      status = http::status::bad_request;
      break;
    case ServiceErrorKind::not_found:
      status = http::status::not_found;
      break;
    case ServiceErrorKind::conflict:
    case ServiceErrorKind::credentials_missing:
      status = http::status::conflict;
      break;
    case ServiceErrorKind::limit_exceeded:
    case ServiceErrorKind::unprocessable:
      status = http::status::unprocessable_entity;
      break;
    case ServiceErrorKind::unavailable:
      status = http::status::service_unavailable;
      break;
    case ServiceErrorKind::internal:
      status = http::status::internal_server_error;
      break;
  }
  return ApiError{status, e.message, e.field, e.limit};
}

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

json resources_json(const ResourceRequest& r) {
  json out = json::object();
  if (r.queue) out["queue"] = *r.queue;
  if (r.nodes) out["nodes"] = *r.nodes;
  if (r.gpus) out["gpus"] = *r.gpus;
  if (r.runtime) out["runtime"] = format_duration(*r.runtime);
  if (r.project) out["project"] = *r.project;
  if (r.reservation) out["reservation"] = *r.reservation;
  if (r.qos) out["qos"] = *r.qos;
  if (r.memory) out["memory"] = format_size(*r.memory);
  return out;
}

json kernel_json(const KernelView& v) {
  json history = json::array();
  for (const auto& h : v.history)
    history.push_back({{"state", to_string(h.state)}, {"at", format_time_utc(h.at)}});
  json progress = json::array();
  for (const auto& p : v.progress)
    progress.push_back({{"at", format_time_utc(p.at)}, {"message", p.message}});
  json out{
      {"id", v.id},
      {"owner", v.owner},
      {"site", v.site},
      {"name", v.name},
      {"tags", v.tags},
      {"kernel", v.kernel_name},
      {"kernel_argv", v.kernel_argv},
      {"resources", resources_json(v.resources)},
      {"state", to_string(v.state)},
      {"end_cause",
       v.end_cause == EndCause::none ? json(nullptr) : json(std::string(to_string(v.end_cause)))},
      {"reason", v.reason},
      {"exit_code", v.exit_code ? json(*v.exit_code) : json(nullptr)},
      {"exit_signal", v.exit_signal ? json(*v.exit_signal) : json(nullptr)},
      {"job", {{"id", v.job_id}, {"url", v.job_url}}},
      {"node", v.node},
      {"walltime_end", v.walltime_end ? json(format_time_utc(*v.walltime_end)) : json(nullptr)},
      {"connection",
       {{"ip", v.hub_ip},
        {"shell_port", v.shell_port},
        {"iopub_port", v.iopub_port},
        {"stdin_port", v.stdin_port},
        {"control_port", v.control_port},
        {"hb_port", v.hb_port}}},
      {"restarts", v.restarts},
      {"link_reconnects", v.link_reconnects},
      {"created_at", format_time_utc(v.created_at)},
      {"history", history},
      {"progress", progress},
      {"version", v.version},
  };
  return out;
}

std::string type_of(const json& j) {
  switch (j.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::number_float:
      return "a fractional number";
    default:
      return "a number";
  }
}

// Reads the fields of one JSON object, refusing unknown ones and wrong types (naming the field).
class ObjectReader {
 public:
  ObjectReader(const json& object, std::string prefix)
      : object_(object), prefix_(std::move(prefix)) {}

  std::optional<ApiError> check_known(const std::vector<std::string>& known) const {
    for (auto it = object_.begin(); it != object_.end(); ++it) {
      if (std::find(known.begin(), known.end(), it.key()) == known.end()) {
        std::string message = "unknown field '" + printable(field(it.key()), kQuoteLimit) + "'";
        const std::string guess = closest_match(it.key(), known);
        if (!guess.empty()) message += " (did you mean '" + field(guess) + "'?)";
        return ApiError{http::status::bad_request, message, printable(field(it.key()), kQuoteLimit),
                        {}};
      }
    }
    return std::nullopt;
  }

  std::string field(const std::string& key) const {
    return prefix_.empty() ? key : prefix_ + "." + key;
  }
  const json* get(const std::string& key) const {
    auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  ApiError wrong_type(const std::string& key, const std::string& expected) const {
    return ApiError{http::status::bad_request,
                    field(key) + " must be " + expected + ", not " + type_of(object_.at(key)),
                    field(key),
                    {}};
  }

  std::optional<ApiError> string(const std::string& key, std::optional<std::string>& out) const {
    const json* j = get(key);
    if (!j) return std::nullopt;
    if (!j->is_string()) return wrong_type(key, "a string");
    std::string value = j->get<std::string>();
    if (value.empty())
      return ApiError{http::status::bad_request, field(key) + " must not be empty", field(key), {}};
    for (char c : value) {
      if (static_cast<unsigned char>(c) < 0x20) {
        return ApiError{http::status::bad_request,
                        field(key) + " contains a control character",
                        field(key),
                        {}};
      }
    }
    out = std::move(value);
    return std::nullopt;
  }

  std::optional<ApiError> integer(const std::string& key, std::optional<int>& out, long min,
                                  long max) const {
    const json* j = get(key);
    if (!j) return std::nullopt;
    if (!j->is_number_integer()) return wrong_type(key, "an integer");
    // Above LLONG_MAX only an unsigned number fits: out of range either way.
    const bool huge = j->is_number_unsigned() &&
                      j->get<std::uint64_t>() > static_cast<std::uint64_t>(LLONG_MAX);
    const auto value = huge ? LLONG_MAX : j->get<long long>();
    if (value < min || value > max) {
      return ApiError{
          http::status::bad_request,
          field(key) + " must be between " + std::to_string(min) + " and " + std::to_string(max),
          field(key),
          {}};
    }
    out = static_cast<int>(value);
    return std::nullopt;
  }

 private:
  const json& object_;
  std::string prefix_;
};

std::optional<ApiError> parse_resources(const json& j, ResourceRequest& r) {
  if (!j.is_object()) {
    return ApiError{http::status::bad_request,
                    "resources must be an object, not " + type_of(j),
                    "resources",
                    {}};
  }
  ObjectReader in(j, "resources");
  if (auto e = in.check_known(
          {"queue", "nodes", "gpus", "runtime", "project", "reservation", "qos", "memory"}))
    return e;
  if (auto e = in.string("queue", r.queue)) return e;
  if (auto e = in.integer("nodes", r.nodes, 1, 1000000)) return e;
  if (auto e = in.integer("gpus", r.gpus, 0, 1024)) return e;
  if (const json* runtime = in.get("runtime")) {
    if (runtime->is_number_integer()) {
      if (runtime->is_number_unsigned() ? runtime->get<std::uint64_t>() > 100ULL * 365 * 86400
                                        : runtime->get<long long>() <= 0 ||
                                              runtime->get<long long>() > 100LL * 365 * 86400) {
        return ApiError{http::status::bad_request,
                        "resources.runtime must be a positive number of seconds",
                        "resources.runtime",
                        {}};
      }
      r.runtime = std::chrono::seconds(runtime->get<long long>());
    } else if (runtime->is_string()) {
      std::string error;
      r.runtime = parse_duration(runtime->get<std::string>(), &error);
      if (!r.runtime)
        return ApiError{
            http::status::bad_request, "resources.runtime: " + error, "resources.runtime", {}};
    } else {
      return in.wrong_type("runtime", "a duration string (\"2h30m\") or a number of seconds");
    }
  }
  if (auto e = in.string("project", r.project)) return e;
  if (auto e = in.string("reservation", r.reservation)) return e;
  if (auto e = in.string("qos", r.qos)) return e;
  if (const json* memory = in.get("memory")) {
    if (memory->is_number_unsigned() ||
        (memory->is_number_integer() && memory->get<long long>() > 0)) {
      r.memory = memory->get<std::uint64_t>();
    } else if (memory->is_string()) {
      std::string error;
      r.memory = parse_size(memory->get<std::string>(), &error);
      if (!r.memory)
        return ApiError{
            http::status::bad_request, "resources.memory: " + error, "resources.memory", {}};
    } else {
      return in.wrong_type("memory", "a size string (\"16G\") or a number of bytes");
    }
  }
  return std::nullopt;
}

std::optional<ApiError> parse_connection(const json& j, HubConnection& c) {
  if (!j.is_object()) {
    return ApiError{http::status::bad_request,
                    "connection must be an object (Jupyter's connection file), not " + type_of(j),
                    "connection",
                    {}};
  }
  ObjectReader in(j, "connection");
  // The keys of Jupyter's connection file; kernel_name is accepted and ignored (the request's
  // kernel decides what runs).
  if (auto e =
          in.check_known({"ip", "transport", "shell_port", "iopub_port", "stdin_port",
                          "control_port", "hb_port", "key", "signature_scheme", "kernel_name"}))
    return e;
  std::optional<std::string> transport, ip, scheme;
  if (auto e = in.string("transport", transport)) return e;
  if (transport && *transport != "tcp") {
    return ApiError{http::status::unprocessable_entity,
                    "connection.transport \"" + printable(*transport, kQuoteLimit) +
                        "\" is not supported; kernel-bridge serves tcp endpoints only",
                    "connection.transport",
                    {}};
  }
  if (auto e = in.string("ip", ip)) return e;
  if (!ip)
    return ApiError{http::status::bad_request, "connection.ip is required", "connection.ip", {}};
  boost::system::error_code ec;
  net::ip::make_address(*ip, ec);
  if (ec)
    return ApiError{http::status::bad_request,
                    "connection.ip \"" + printable(*ip, kQuoteLimit) + "\" is not an IP address",
                    "connection.ip",
                    {}};
  c.ip = *ip;
  std::set<int> seen;
  const std::pair<const char*, std::uint16_t*> ports[] = {{"shell_port", &c.shell_port},
                                                          {"iopub_port", &c.iopub_port},
                                                          {"stdin_port", &c.stdin_port},
                                                          {"control_port", &c.control_port},
                                                          {"hb_port", &c.hb_port}};
  for (const auto& [key, slot] : ports) {
    std::optional<int> port;
    if (auto e = in.integer(key, port, 1, 65535)) return e;
    if (!port)
      return ApiError{http::status::bad_request, in.field(key) + " is required", in.field(key), {}};
    if (!seen.insert(*port).second) {
      return ApiError{
          http::status::bad_request,
          in.field(key) + " " + std::to_string(*port) + " is used by another channel too",
          in.field(key),
          {}};
    }
    *slot = static_cast<std::uint16_t>(*port);
  }
  if (const json* key = in.get("key")) {
    if (!key->is_string()) return in.wrong_type("key", "a string");
    c.key = key->get<std::string>();
  }
  if (auto e = in.string("signature_scheme", scheme)) return e;
  if (scheme) {
    if (scheme->rfind("hmac-", 0) != 0 || scheme->size() == 5) {
      return ApiError{http::status::bad_request,
                      "connection.signature_scheme must be hmac-<digest>, e.g. hmac-sha256",
                      "connection.signature_scheme",
                      {}};
    }
    c.signature_scheme = *scheme;
  }
  return std::nullopt;
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

bool is_live(const KernelView& v) {
  return v.state != KernelState::ended;
}

// A parsed request target: path segments (percent-decoded) and query parameters.
struct Target {
  std::vector<std::string> segments;
  std::map<std::string, std::string> query;
  bool ok = true;
};

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

}  // namespace

std::string format_time_utc(Clock::time_point t) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  long millis = static_cast<long>(ms % 1000);
  if (millis < 0) {
    millis += 1000;
    --secs;
  }
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
  return buf;
}

std::optional<Clock::time_point> parse_time_utc(const std::string& text) {
  // 2026-11-26T16:00:00Z, with optional .fraction, and Z or ±hh:mm.
  std::tm tm{};
  int year, month, day, hour, minute, second;
  int consumed = 0;
  if (std::sscanf(text.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &year, &month, &day, &hour, &minute,
                  &second, &consumed) != 6 ||
      consumed != 19) {
    return std::nullopt;
  }
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60)
    return std::nullopt;
  // Clock counts nanoseconds in 64 bits (up to the year 2262): later years are not a time we can
  // hold, and converting them would overflow (found by control_api_fuzz).
  if (year < 1970 || year >= 2200) return std::nullopt;
  std::size_t i = 19;
  long long millis = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    int digits = 0;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
      if (digits < 3) millis = millis * 10 + (text[i] - '0');
      ++digits;
      ++i;
    }
    if (digits == 0) return std::nullopt;
    for (; digits < 3; ++digits) millis *= 10;
  }
  long offset = 0;
  if (i < text.size() && (text[i] == 'Z' || text[i] == 'z')) {
    ++i;
  } else if (i + 6 == text.size() && (text[i] == '+' || text[i] == '-') && text[i + 3] == ':') {
    int oh = 0, om = 0;
    if (std::sscanf(text.c_str() + i + 1, "%2d:%2d", &oh, &om) != 2) return std::nullopt;
    offset = (oh * 3600L + om * 60L) * (text[i] == '+' ? 1 : -1);
    i += 6;
  } else {
    return std::nullopt;
  }
  if (i != text.size()) return std::nullopt;
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  const std::time_t secs = timegm(&tm) - offset;
  return Clock::time_point(std::chrono::milliseconds(static_cast<long long>(secs) * 1000 + millis));
}

// ---------------------------------------------------------------------------------------------

class SessionBase {
 public:
  virtual ~SessionBase() = default;
  virtual void close() = 0;
};

struct ControlApi::Impl : std::enable_shared_from_this<ControlApi::Impl> {
  Impl(net::io_context& io_, const BridgeConfig& config_, KernelService& kernels_,
       auth::CredentialsStore& credentials_, BridgeMetrics& metrics_)
      : io(io_),
        config(config_),
        kernels(kernels_),
        credentials(credentials_),
        metrics(metrics_),
        limits(ConnectionLimits::Settings{config_.api.max_connections,
                                          config_.api.max_connections_per_user,
                                          std::min<std::size_t>(64, config_.api.max_connections / 8),
                                          std::min<std::size_t>(64, config_.api.max_connections)}) {}

  net::io_context& io;
  const BridgeConfig& config;
  KernelService& kernels;
  auth::CredentialsStore& credentials;
  BridgeMetrics& metrics;
  ConnectionLimits limits;
  std::optional<auth::ApiTokens> tokens;
  std::optional<net::local::stream_protocol::acceptor> unix_acceptor;
  std::optional<net::ip::tcp::acceptor> tcp_acceptor;
  std::string socket_path;  // set once we created it, so stop() removes only our own file
  std::map<std::uint64_t, std::weak_ptr<SessionBase>> sessions;
  std::uint64_t next_session = 0;
  std::map<std::uint64_t, std::shared_ptr<net::steady_timer>> waits;  // long polls
  std::uint64_t next_wait = 0;
  std::unique_ptr<net::thread_pool> lookups;  // getpwuid_r off the event loop
  std::map<uid_t, std::pair<std::optional<std::string>, std::chrono::steady_clock::time_point>>
      user_cache;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_refusal_log{};
  std::uint64_t refusals_unlogged = 0;
  bool stopped = false;

  void accept_unix();
  void accept_tcp();
  void resolve_user(uid_t uid, std::function<void(std::optional<std::string>)> done);
  // `session` is the connection's id (0 for requests that come from no connection, e.g. tests):
  // the first authenticated request moves a TCP connection into its token user's budget.
  void handle(const Peer& peer, HttpRequest request, std::function<void(HttpResponse)> done,
              std::uint64_t session = 0);
  void route(const Peer& peer, const HttpRequest& request, const Target& target,
             std::uint64_t session, std::function<void(http::status, json, http::fields)> reply);
  std::variant<Caller, ApiError> authenticate(const Peer& peer, const HttpRequest& request,
                                              std::uint64_t session);
  // A connection refused or dropped by the limits: one warning per 10 s at most, with a count.
  void log_refusal(const std::string& why);
  bool is_admin_user(const std::string& user) const {
    const auto& admins = config.api.admin_users;
    return std::find(admins.begin(), admins.end(), user) != admins.end();
  }

  bool visible(const Caller& caller, const KernelView& v) const {
    return caller.sees_all || v.owner == caller.user;
  }
  void create_kernel(const Caller& caller, const std::string& body,
                     std::function<void(http::status, json, http::fields)> reply);
  void wait_for_change(const std::string& id, std::uint64_t after,
                       std::chrono::milliseconds timeout, Caller caller,
                       std::function<void(http::status, json, http::fields)> reply);
  json health_json() const;
};

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
    stream_.expires_after(first_ ? api_->config.api.header_timeout
                                 : api_->config.api.idle_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
                              if (ec || self->parser_->is_done()) return self->on_read(ec);
                              self->stream_.expires_after(self->api_->config.api.read_timeout);
                              http::async_read(self->stream_, self->buffer_, *self->parser_,
                                               [self](beast::error_code ec2, std::size_t) {
                                                 self->on_read(ec2);
                                               });
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
  [[maybe_unused]] ssize_t sent = ::send(socket.native_handle(), answer.data(), answer.size(),
                                         MSG_DONTWAIT | MSG_NOSIGNAL);
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
        refuse_connection(socket, "the control API's TCP listener has api.max_connections "
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
        return ApiError{http::status::service_unavailable, *refusal, {}, "api.max_connections_per_user"};
      }
    }
  }
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
  return caller;
}

void ControlApi::Impl::handle(const Peer& peer, HttpRequest request,
                              std::function<void(HttpResponse)> done, std::uint64_t session) {
  const auto t0 = std::chrono::steady_clock::now();
  const unsigned version = request.version();
  const bool keep_alive = request.keep_alive();
  const std::string method(request.method_string());
  Target target = parse_target(std::string_view(request.target().data(), request.target().size()));
  // The route template (ids replaced) keeps the metric's label set bounded.
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
  static const std::set<std::string> kRoutes = {
      "/v1/health",          "/metrics",
      "/v1/kernels",         "/v1/kernels/{id}",
      "/v1/kernels/{id}/interrupt", "/v1/kernels/{id}/restart",
      "/v1/users/{user}/credentials"};
  if (!kRoutes.count(route_label)) route_label = "(other)";
  static const std::set<std::string> kMethods = {"GET", "POST", "PUT", "DELETE", "HEAD",
                                                 "OPTIONS", "PATCH"};
  const std::string method_label = kMethods.count(method) ? method : std::string("(other)");
  std::string who = peer.transport == Peer::Transport::tcp
                        ? "tcp " + peer.remote
                        : (peer.unix_user ? *peer.unix_user : std::string("uid ?"));
  // The path only (query strings are not secret here, but keep lines short and uniform), quoted
  // and cut: a client decides what it holds.
  const std::string path =
      printable(std::string_view(request.target().data(), request.target().size())
                    .substr(0, request.target().find('?')),
                kQuoteLimit);
  auto self = shared_from_this();
  // Called exactly once per request; a second call (a handler that failed after replying) is
  // logged and ignored.
  auto replied = std::make_shared<bool>(false);
  auto reply = [self, done = std::move(done), version, keep_alive, method, method_label,
                route_label, who, path, t0,
                replied](http::status status, json body, http::fields extra) {
    if (*replied) {
      spdlog::error("api: {} {} {}: a second answer ({}) was dropped", who, method, path,
                    static_cast<int>(status));
      return;
    }
    *replied = true;
    HttpResponse response{status, version};
    response.set(http::field::server, "kernel-bridge/" KB_VERSION);
    for (const auto& f : extra) response.set(f.name_string(), f.value());
    if (response[http::field::content_type].empty()) {
      response.set(http::field::content_type, "application/json");
      if (status != http::status::no_content) response.body() = dump_json(body) + "\n";
    } else {
      response.body() = body.get<std::string>();
    }
    // Connection: close from a handler (e.g. a refused connection) ends the keep-alive.
    response.keep_alive(keep_alive && !beast::iequals(response[http::field::connection], "close"));
    response.prepare_payload();
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    spdlog::info("api: {} {} {} -> {} ({} ms)", who, method, path, static_cast<int>(status), ms);
    self->metrics.api_requests
        .with({method_label, route_label, std::to_string(static_cast<int>(status))})
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
    spdlog::error("api: {} {} {}: internal error while handling the request: {}", who, method,
                  path, printable(e.what(), 400));
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

void ControlApi::Impl::route(const Peer& peer, const HttpRequest& request, const Target& target,
                             std::uint64_t session,
                             std::function<void(http::status, json, http::fields)> reply) {
  const auto& seg = target.segments;
  const http::verb verb = request.method();
  auto error = [&reply](const ApiError& e, http::fields extra = {}) {
    reply(e.status, error_body(e), std::move(extra));
  };
  auto method_not_allowed = [&](const char* allow) {
    http::fields extra;
    extra.set(http::field::allow, allow);
    error({http::status::method_not_allowed,
           std::string(request.method_string()) + " is not allowed here (allowed: " + allow + ")",
           {},
           {}},
          std::move(extra));
  };

  // Open to everyone who can connect: liveness for monitors.
  if (seg == std::vector<std::string>{"v1", "health"}) {
    if (verb != http::verb::get) return method_not_allowed("GET");
    return reply(http::status::ok, health_json(), {});
  }

  auto authenticated = authenticate(peer, request, session);
  if (auto* e = std::get_if<ApiError>(&authenticated)) {
    http::fields extra;
    if (e->status == http::status::unauthorized)
      extra.set(http::field::www_authenticate, "Bearer realm=\"kernel-bridge\"");
    if (e->status == http::status::service_unavailable) {
      extra.set(http::field::connection, "close");
      extra.set(http::field::retry_after, "5");
    }
    return error(*e, std::move(extra));
  }
  const Caller caller = std::get<Caller>(authenticated);

  const bool has_body_method = verb == http::verb::post || verb == http::verb::put;
  if (has_body_method && !request.body().empty() &&
      !is_json_media_type(request[http::field::content_type])) {
    return error({http::status::unsupported_media_type,
                  "send the body as application/json",
                  "Content-Type",
                  {}});
  }
  // A query parameter a route does not know is a mistake worth hearing about (e.g. ?wiat=30s).
  const bool kernel_route = seg.size() == 3 && seg[0] == "v1" && seg[1] == "kernels";
  for (const auto& [key, value] : target.query) {
    if (kernel_route && verb == http::verb::get && (key == "wait" || key == "after")) continue;
    return error({http::status::bad_request,
                  "unknown query parameter '" + printable(key, kQuoteLimit) + "'" +
                      (kernel_route ? " (GET /v1/kernels/{id} takes wait and after)"
                                    : " (this route takes none)"),
                  printable(key, kQuoteLimit),
                  {}});
  }

  if (seg == std::vector<std::string>{"metrics"}) {
    if (verb != http::verb::get) return method_not_allowed("GET");
    http::fields extra;
    extra.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    return reply(http::status::ok, json(metrics.registry.render()), std::move(extra));
  }

  if (seg.size() >= 2 && seg[0] == "v1" && seg[1] == "kernels") {
    if (seg.size() == 2) {
      if (verb == http::verb::get) {
        json list = json::array();
        for (const auto& v : kernels.list()) {
          if (visible(caller, v)) list.push_back(kernel_json(v));
        }
        return reply(http::status::ok, json{{"kernels", list}}, {});
      }
      if (verb == http::verb::post) return create_kernel(caller, request.body(), reply);
      return method_not_allowed("GET, POST");
    }
    const std::string& id = seg[2];
    auto view = kernels.get(id);
    // Another user's kernel is "not found": its existence is not revealed.
    const bool found = view && visible(caller, *view);
    auto not_found = [&] {
      error({http::status::not_found, "no kernel " + printable(id, kQuoteLimit), "id", {}});
    };
    auto action_done = [this, reply, id](std::optional<ServiceError> err) {
      if (err)
        return reply(from_service_error(*err).status, error_body(from_service_error(*err)), {});
      auto now = kernels.get(id);
      reply(http::status::accepted, now ? kernel_json(*now) : json{{"id", id}}, {});
    };
    if (seg.size() == 3) {
      if (verb == http::verb::get) {
        if (!found) return not_found();
        if (view->owner == caller.user) kernels.watched(id);
        auto wait = target.query.find("wait");
        std::optional<std::chrono::seconds> timeout;
        if (wait != target.query.end()) {
          std::string error_text;
          timeout = parse_duration(wait->second, &error_text);
          if (!timeout)
            return error(
                {http::status::bad_request, "wait: " + printable(error_text), "wait", {}});
        }
        std::uint64_t after = view->version;
        if (auto a = target.query.find("after"); a != target.query.end()) {
          const auto parsed = parse_version(a->second);
          if (!parsed)
            return error(
                {http::status::bad_request, "after must be a kernel version number", "after", {}});
          if (!timeout)
            return error({http::status::bad_request,
                          "after only means something with wait (e.g. ?wait=30s&after=4)",
                          "after",
                          {}});
          after = *parsed;
        }
        if (!timeout) return reply(http::status::ok, kernel_json(*view), {});
        const auto limit = std::min<std::chrono::seconds>(*timeout, config.api.max_wait);
        return wait_for_change(id, after, limit, caller, reply);
      }
      if (verb == http::verb::delete_) {
        if (!found) return not_found();
        return kernels.remove(caller, id, action_done);
      }
      return method_not_allowed("GET, DELETE");
    }
    if (seg.size() == 4 && (seg[3] == "interrupt" || seg[3] == "restart")) {
      if (verb != http::verb::post) return method_not_allowed("POST");
      if (!found) return not_found();
      if (seg[3] == "interrupt") return kernels.interrupt(caller, id, action_done);
      return kernels.restart(caller, id, action_done);
    }
  }

  if (seg.size() == 4 && seg[0] == "v1" && seg[1] == "users" && seg[3] == "credentials") {
    const std::string& user = seg[2];
    if (verb != http::verb::put && verb != http::verb::get && verb != http::verb::delete_) {
      return method_not_allowed("PUT, GET, DELETE");
    }
    if (!valid_user_name(user))
      return error({http::status::bad_request, "not a valid user name", "user", {}});
    // The real user (not the one acted for) decides: an admin may set anyone's, others only their
    // own.
    if (user != caller.user && !caller.admin) {
      return error(
          {http::status::forbidden, "you may manage only your own credentials", "user", {}});
    }
    auto info_json = [](const std::string& u, const auth::CredentialsStore::Info& info) {
      const char* status = info.status == auth::CredentialsStore::Status::valid     ? "valid"
                           : info.status == auth::CredentialsStore::Status::expired ? "expired"
                                                                              : "missing";
      return json{
          {"user", u},
          {"status", status},
          {"expires_at", info.expires_at ? json(format_time_utc(*info.expires_at)) : json(nullptr)},
          {"updated_at", info.status == auth::CredentialsStore::Status::missing
                             ? json(nullptr)
                             : json(format_time_utc(info.updated_at))}};
    };
    if (verb == http::verb::get)
      return reply(http::status::ok, info_json(user, credentials.info(user)), {});
    if (verb == http::verb::delete_) {
      credentials.erase(user);
      return reply(http::status::no_content, json(), {});
    }
    // PUT. The body holds a secret: nothing below logs or echoes it.
    json body = json::parse(request.body(), nullptr, false);
    if (body.is_discarded())
      return error({http::status::bad_request, "the body is not valid JSON", {}, {}});
    if (!body.is_object())
      return error({http::status::bad_request, "the body must be a JSON object", {}, {}});
    ObjectReader in(body, "");
    if (auto e = in.check_known({"token", "expires_at"})) return error(*e);
    const json* token = in.get("token");
    if (!token) return error({http::status::bad_request, "token is required", "token", {}});
    if (!token->is_string()) return error(in.wrong_type("token", "a string"));
    const std::string& text = token->get_ref<const std::string&>();
    if (text.empty())
      return error({http::status::bad_request, "token must not be empty", "token", {}});
    for (char c : text) {
      if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) == 0x7f) {
        return error({http::status::bad_request,
                      "token contains whitespace or a control character",
                      "token",
                      {}});
      }
    }
    std::optional<Clock::time_point> expires;
    if (const json* e = in.get("expires_at")) {
      if (e->is_number()) {
        // Unix seconds before the year 2200: Clock holds nanoseconds in 64 bits (until 2262).
        constexpr double kMaxUnixSeconds = 7258118399.0;
        const double seconds = e->get<double>();
        if (!(seconds >= 0 && seconds <= kMaxUnixSeconds))
          return error({http::status::bad_request,
                        "expires_at must be Unix seconds between 0 and 7258118399 (2199), or RFC 3339",
                        "expires_at",
                        {}});
        expires = Clock::time_point(std::chrono::seconds(static_cast<long long>(seconds)));
      } else if (e->is_string()) {
        expires = parse_time_utc(e->get<std::string>());
        if (!expires)
          return error({http::status::bad_request,
                        "expires_at must be RFC 3339 (2026-11-26T18:00:00Z, before 2200) or Unix seconds",
                        "expires_at",
                        {}});
      } else {
        return error(in.wrong_type("expires_at", "an RFC 3339 string or Unix seconds"));
      }
      if (*expires <= Clock::now()) {
        return error({http::status::unprocessable_entity,
                      "expires_at is in the past: the token has expired already",
                      "expires_at",
                      {}});
      }
    }
    credentials.set(user, text, expires);
    return reply(http::status::ok, info_json(user, credentials.info(user)), {});
  }

  error({http::status::not_found,
         "no such route: " + std::string(request.method_string()) + " " +
             printable(std::string_view(request.target().data(), request.target().size())
                           .substr(0, request.target().find('?')),
                       kQuoteLimit) +
             " (see docs/control-api.md)",
         {},
         {}});
}

void ControlApi::Impl::create_kernel(const Caller& caller, const std::string& text,
                                     std::function<void(http::status, json, http::fields)> reply) {
  auto error = [&reply](const ApiError& e) { reply(e.status, error_body(e), {}); };
  json body;
  try {
    body = json::parse(text);
  } catch (const json::parse_error& e) {
    return error({http::status::bad_request,
                  "the body is not valid JSON (at byte " + std::to_string(e.byte) + ")",
                  {},
                  {}});
  } catch (const json::exception& e) {
    // E.g. a number too large for a double (1e400): valid JSON text, but no value we can hold.
    return error({http::status::bad_request,
                  "the body holds a number out of range (" + printable(e.what()) + ")",
                  {},
                  {}});
  }
  if (!body.is_object())
    return error({http::status::bad_request, "the body must be a JSON object", {}, {}});
  ObjectReader in(body, "");
  if (auto e = in.check_known(
          {"site", "kernel", "kernel_argv", "resources", "connection", "name", "tags", "lease"}))
    return error(*e);

  KernelRequest request;
  std::optional<std::string> site_name, kernel, name;
  if (auto e = in.string("site", site_name)) return error(*e);
  if (!site_name) return error({http::status::bad_request, "site is required", "site", {}});
  const SiteConfig* site = config.find_site(*site_name);
  if (!site) {
    std::string list;
    std::vector<std::string> names;
    for (const auto& s : config.sites) {
      list += (list.empty() ? "" : ", ") + s.name;
      names.push_back(s.name);
    }
    std::string message = "unknown site \"" + printable(*site_name, kQuoteLimit) + "\"";
    const std::string guess = closest_match(*site_name, names);
    message +=
        guess.empty() ? " (configured sites: " + list + ")" : " (did you mean \"" + guess + "\"?)";
    return error({http::status::unprocessable_entity, message, "site", {}});
  }
  request.site = site->name;

  if (auto e = in.string("kernel", kernel)) return error(*e);
  if (const json* argv = in.get("kernel_argv")) {
    if (kernel)
      return error({http::status::bad_request,
                    "give either kernel or kernel_argv, not both",
                    "kernel_argv",
                    {}});
    if (!argv->is_array() || argv->empty())
      return error({http::status::bad_request,
                    "kernel_argv must be a non-empty array of strings",
                    "kernel_argv",
                    {}});
    bool placeholder = false;
    for (const auto& a : *argv) {
      if (!a.is_string())
        return error({http::status::bad_request,
                      "kernel_argv must contain only strings",
                      "kernel_argv",
                      {}});
      request.kernel_argv.push_back(a.get<std::string>());
      placeholder =
          placeholder || request.kernel_argv.back().find("{connection_file}") != std::string::npos;
    }
    if (!placeholder) {
      return error({http::status::bad_request,
                    "kernel_argv must contain \"{connection_file}\" where the kernel expects its "
                    "connection file",
                    "kernel_argv",
                    {}});
    }
  } else {
    if (!kernel && site->default_kernel.empty()) {
      return error({http::status::bad_request,
                    "kernel is required (site " + site->name + " has no default_kernel)",
                    "kernel",
                    {}});
    }
    const std::string chosen = kernel ? *kernel : site->default_kernel;
    auto found = site->kernels.find(chosen);
    if (found == site->kernels.end()) {
      std::string list;
      for (const auto& [n, argv] : site->kernels) list += (list.empty() ? "" : ", ") + n;
      return error({http::status::unprocessable_entity,
                    "site " + site->name + " has no kernel \"" + printable(chosen, kQuoteLimit) +
                        "\" (configured: " + (list.empty() ? "none" : list) + ")",
                    "kernel",
                    {}});
    }
    request.kernel_name = chosen;
    request.kernel_argv = found->second;
  }

  if (const json* r = in.get("resources")) {
    if (auto e = parse_resources(*r, request.resources)) return error(*e);
  }
  const json* connection = in.get("connection");
  if (!connection)
    return error({http::status::bad_request,
                  "connection is required (the hub-side ports and key Jupyter chose)",
                  "connection",
                  {}});
  if (auto e = parse_connection(*connection, request.connection)) return error(*e);
  if (auto e = in.string("name", name)) return error(*e);
  if (name) request.name = *name;
  std::optional<int> lease;
  if (auto e = in.integer("lease", lease, 5, 86400)) return error(*e);
  if (lease) request.lease = std::chrono::seconds(*lease);
  if (const json* tags = in.get("tags")) {
    if (!tags->is_object()) return error(in.wrong_type("tags", "an object of strings"));
    if (tags->size() > 32) return error({http::status::bad_request, "at most 32 tags", "tags", {}});
    for (auto it = tags->begin(); it != tags->end(); ++it) {
      if (!it.value().is_string()) {
        return error({http::status::bad_request,
                      "tags." + printable(it.key(), kQuoteLimit) + " must be a string, not " +
                          type_of(it.value()),
                      "tags." + printable(it.key(), kQuoteLimit),
                      {}});
      }
      request.tags[it.key()] = it.value().get<std::string>();
    }
  }

  apply_defaults(*site, request.resources);
  if (auto violation = validate_request(*site, request)) {
    return error({http::status::unprocessable_entity, violation->message, violation->field,
                  violation->limit});
  }
  if (config.max_kernels_per_user > 0) {
    int live = 0;
    for (const auto& v : kernels.list()) live += (v.owner == caller.user && is_live(v)) ? 1 : 0;
    if (live >= config.max_kernels_per_user) {
      return error({http::status::unprocessable_entity,
                    "you have " + std::to_string(live) +
                        " kernels running, the bridge's max_kernels_per_user is " +
                        std::to_string(config.max_kernels_per_user) + "; stop one first",
                    {},
                    "max_kernels_per_user"});
    }
  }
  kernels.create(caller, std::move(request),
                 [reply](std::variant<KernelView, ServiceError> result) {
                   if (auto* e = std::get_if<ServiceError>(&result)) {
                     const ApiError api = from_service_error(*e);
                     return reply(api.status, error_body(api), {});
                   }
                   const KernelView& view = std::get<KernelView>(result);
                   http::fields extra;
                   extra.set(http::field::location, "/v1/kernels/" + view.id);
                   reply(http::status::created, kernel_json(view), std::move(extra));
                 });
}

void ControlApi::Impl::wait_for_change(
    const std::string& id, std::uint64_t after, std::chrono::milliseconds timeout, Caller caller,
    std::function<void(http::status, json, http::fields)> reply) {
  auto view = kernels.get(id);
  if (!view || !visible(caller, *view)) {
    return reply(http::status::not_found,
                 error_body({http::status::not_found, "no kernel " + printable(id, kQuoteLimit), "id", {}}), {});
  }
  if (view->version > after || view->state == KernelState::ended || timeout.count() == 0) {
    return reply(http::status::ok, kernel_json(*view), {});
  }
  struct Wait {
    std::uint64_t listener = 0;
    std::uint64_t key = 0;
    bool done = false;
    std::function<void(http::status, json, http::fields)> reply;
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
      wait->reply(http::status::not_found,
                  error_body({http::status::not_found, "no kernel " + printable(id, kQuoteLimit), "id", {}}), {});
  };
  wait->listener = kernels.subscribe([id, after, finish](const KernelView& changed) {
    if (changed.id == id && changed.version > after) finish();
  });
  timer->async_wait([finish](beast::error_code) { finish(); });
}

// ---------------------------------------------------------------------------------------------

ControlApi::ControlApi(net::io_context& io, const BridgeConfig& config, KernelService& kernels,
                       auth::CredentialsStore& credentials, BridgeMetrics& metrics)
    : impl_(std::make_shared<Impl>(io, config, kernels, credentials, metrics)) {
  // kb_kernels{state} is computed at scrape time from the service (scrapes run on the io thread).
  std::weak_ptr<Impl> weak = impl_;
  metrics.registry.add_collector([weak] {
    auto impl = weak.lock();
    if (!impl) return;
    std::map<KernelState, int> counts;
    for (const auto& v : impl->kernels.list()) counts[v.state]++;
    for (auto s : kAllKernelStates)
      impl->metrics.kernels.with({std::string(to_string(s))}).set(counts[s]);
  });
  metrics.up_since.unlabelled().set(
      std::chrono::duration<double>(Clock::now().time_since_epoch()).count());
}

ControlApi::~ControlApi() {
  stop();
}

std::optional<net::ip::tcp::endpoint> ControlApi::tcp_endpoint() const {
  if (!impl_->tcp_acceptor) return std::nullopt;
  beast::error_code ec;
  auto ep = impl_->tcp_acceptor->local_endpoint(ec);
  if (ec) return std::nullopt;
  return ep;
}

void ControlApi::handle(const Peer& peer, HttpRequest request,
                        std::function<void(HttpResponse)> done) {
  impl_->handle(peer, std::move(request), std::move(done));
}

namespace {

// Prepares the socket's path: creates the directory (0755) if missing, removes a stale socket,
// refuses to replace anything else or a socket someone still listens on.
void prepare_socket_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    throw std::runtime_error("api.unix_socket " + path + " is too long for a Unix socket (max " +
                             std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) +
                             " bytes); choose a shorter path");
  }
  const fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  if (!dir.empty() && !fs::exists(dir, ec)) {
    fs::create_directories(dir, ec);
    if (ec)
      throw std::runtime_error("cannot create the directory of api.unix_socket " + dir.string() +
                               ": " + ec.message());
    ::chmod(dir.c_str(), 0755);
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;  // nothing there
  if (!S_ISSOCK(st.st_mode)) {
    throw std::runtime_error("api.unix_socket " + path +
                             " exists and is not a socket; remove it or choose another path");
  }
  net::io_context probe_io;
  net::local::stream_protocol::socket probe(probe_io);
  boost::system::error_code connect_error;
  probe.connect(net::local::stream_protocol::endpoint(path), connect_error);
  if (!connect_error) {
    throw std::runtime_error(
        "another process is listening on api.unix_socket " + path +
        " (is a kernel-bridge already running?); stop it or choose another path");
  }
  if (::unlink(path.c_str()) != 0) {
    throw std::runtime_error("cannot remove the stale socket " + path + ": " +
                             std::strerror(errno));
  }
  spdlog::info("api: removed stale socket {}", path);
}

}  // namespace

std::string ControlApi::reload_tokens() {
  Impl& impl = *impl_;
  const std::string& path = impl.config.api.tokens_file;
  if (path.empty()) return {};
  try {
    impl.tokens = auth::ApiTokens::load(path);
  } catch (const std::exception& e) {
    spdlog::error("api: {} not reloaded, the tokens loaded before stay in use: {}", path, e.what());
    return e.what();
  }
  spdlog::info("api: tokens reloaded from {}", path);
  return {};
}

void ControlApi::start() {
  Impl& impl = *impl_;
  const ApiConfig& api = impl.config.api;
  impl.stopped = false;
  if (!api.tokens_file.empty()) impl.tokens = auth::ApiTokens::load(api.tokens_file);
  impl.lookups = std::make_unique<net::thread_pool>(1);
  if (!api.unix_socket.empty()) {
    prepare_socket_path(api.unix_socket);
    impl.unix_acceptor.emplace(impl.io);
    net::local::stream_protocol::endpoint endpoint(api.unix_socket);
    boost::system::error_code ec;
    impl.unix_acceptor->open(endpoint.protocol(), ec);
    if (!ec) impl.unix_acceptor->bind(endpoint, ec);
    if (ec)
      throw std::runtime_error("cannot bind api.unix_socket " + api.unix_socket + ": " +
                               ec.message());
    impl.socket_path = api.unix_socket;
    // Everyone may connect: SO_PEERCRED tells us who they are, and they see only their kernels.
    if (::chmod(api.unix_socket.c_str(), 0666) != 0) {
      throw std::runtime_error("cannot chmod 0666 api.unix_socket " + api.unix_socket + ": " +
                               std::strerror(errno));
    }
    impl.unix_acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("cannot listen on api.unix_socket " + api.unix_socket + ": " +
                               ec.message());
    spdlog::info("api: listening on unix socket {}", api.unix_socket);
    impl.accept_unix();
  }
  if (api.tcp) {
    boost::system::error_code ec;
    auto address = net::ip::make_address(api.tcp->host, ec);
    if (ec) {
      throw std::runtime_error(
          "api.tcp host " + api.tcp->host +
          " is not an IP address; write the address to listen on, e.g. 127.0.0.1:8765");
    }
    net::ip::tcp::endpoint endpoint(address, api.tcp->port);
    impl.tcp_acceptor.emplace(impl.io);
    impl.tcp_acceptor->open(endpoint.protocol(), ec);
    if (!ec) impl.tcp_acceptor->set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) impl.tcp_acceptor->bind(endpoint, ec);
    if (!ec) impl.tcp_acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("cannot listen on api.tcp " + api.tcp->str() + ": " + ec.message());
    spdlog::info("api: listening on tcp {} ({} tokens)",
                 endpoint.address().to_string() + ":" +
                     std::to_string(impl.tcp_acceptor->local_endpoint().port()),
                 impl.tokens ? impl.tokens->size() : 0);
    impl.accept_tcp();
  }
}

void ControlApi::stop() {
  Impl& impl = *impl_;
  if (impl.stopped) return;
  impl.stopped = true;
  boost::system::error_code ignored;
  if (impl.unix_acceptor) impl.unix_acceptor->close(ignored);
  if (impl.tcp_acceptor) impl.tcp_acceptor->close(ignored);
  if (!impl.socket_path.empty()) {
    ::unlink(impl.socket_path.c_str());
    impl.socket_path.clear();
  }
  for (auto& [key, weak] : impl.sessions) {
    if (auto session = weak.lock()) session->close();
  }
  impl.sessions.clear();
  auto waits = impl.waits;
  for (auto& [key, timer] : waits) timer->cancel();
  if (impl.lookups) {
    impl.lookups->join();
    impl.lookups.reset();
  }
}

}  // namespace kb::bridge
