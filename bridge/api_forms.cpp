// The control API's wire forms (bridge/api_forms.hpp): kernel, resource and credentials JSON, error
// bodies, the readers of the create and credentials request bodies, and the RFC 3339 time stamps.
#include "bridge/api_forms.hpp"

#include <algorithm>
#include <boost/asio/ip/address.hpp>
#include <cctype>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <initializer_list>
#include <set>

#include "bridge/config.hpp"
#include "common/text.hpp"

namespace kb::bridge {

namespace http = boost::beast::http;
using json = nlohmann::json;

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
  // 2026-11-26T16:00:00Z, with optional .fraction, and Z or ±hh:mm. Digits where the form has
  // them: sscanf alone also took "-1" for an hour and "+05:3*" for an offset (found by
  // api_forms_fuzz).
  auto digits_at = [&text](std::initializer_list<std::size_t> positions) {
    for (std::size_t p : positions) {
      if (p >= text.size() || !std::isdigit(static_cast<unsigned char>(text[p]))) return false;
    }
    return true;
  };
  if (!digits_at({0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18})) return std::nullopt;
  std::tm tm{};
  int year, month, day, hour, minute, second;
  int consumed = 0;
  if (std::sscanf(text.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &year, &month, &day, &hour, &minute,
                  &second, &consumed) != 6 ||
      consumed != 19) {
    return std::nullopt;
  }
  static constexpr int kDaysInMonth[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const bool leap_year = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
  if (month < 1 || month > 12 || day < 1 || day > kDaysInMonth[month - 1] ||
      (month == 2 && day == 29 && !leap_year) || hour > 23 || minute > 59 || second > 60)
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
  } else if (i + 6 == text.size() && (text[i] == '+' || text[i] == '-') && text[i + 3] == ':' &&
             digits_at({i + 1, i + 2, i + 4, i + 5})) {
    int oh = 0, om = 0;
    if (std::sscanf(text.c_str() + i + 1, "%2d:%2d", &oh, &om) != 2 || oh > 23 || om > 59)
      return std::nullopt;
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

std::optional<ApiError> ObjectReader::check_known(const std::vector<std::string>& known) const {
  for (auto it = object_.begin(); it != object_.end(); ++it) {
    if (std::find(known.begin(), known.end(), it.key()) == known.end()) {
      std::string message = "unknown field '" + printable(field(it.key()), kQuoteLimit) + "'";
      const std::string guess = closest_match(it.key(), known);
      if (!guess.empty()) message += " (did you mean '" + field(guess) + "'?)";
      return ApiError{
          http::status::bad_request, message, printable(field(it.key()), kQuoteLimit), {}};
    }
  }
  return std::nullopt;
}

std::string ObjectReader::field(const std::string& key) const {
  return prefix_.empty() ? key : prefix_ + "." + key;
}

const json* ObjectReader::get(const std::string& key) const {
  auto it = object_.find(key);
  if (it == object_.end() || it->is_null()) return nullptr;
  return &*it;
}

ApiError ObjectReader::wrong_type(const std::string& key, const std::string& expected) const {
  return ApiError{http::status::bad_request,
                  field(key) + " must be " + expected + ", not " + type_of(object_.at(key)),
                  field(key),
                  {}};
}

std::optional<ApiError> ObjectReader::string(const std::string& key,
                                             std::optional<std::string>& out) const {
  const json* j = get(key);
  if (!j) return std::nullopt;
  if (!j->is_string()) return wrong_type(key, "a string");
  std::string value = j->get<std::string>();
  if (value.empty())
    return ApiError{http::status::bad_request, field(key) + " must not be empty", field(key), {}};
  for (char c : value) {
    if (static_cast<unsigned char>(c) < 0x20) {
      return ApiError{
          http::status::bad_request, field(key) + " contains a control character", field(key), {}};
    }
  }
  out = std::move(value);
  return std::nullopt;
}

std::optional<ApiError> ObjectReader::integer(const std::string& key, std::optional<int>& out,
                                              long min, long max) const {
  const json* j = get(key);
  if (!j) return std::nullopt;
  if (!j->is_number_integer()) return wrong_type(key, "an integer");
  // Above LLONG_MAX only an unsigned number fits: out of range either way.
  const bool huge =
      j->is_number_unsigned() && j->get<std::uint64_t>() > static_cast<std::uint64_t>(LLONG_MAX);
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
      if (runtime->is_number_unsigned()
              ? runtime->get<std::uint64_t>() > 100ULL * 365 * 86400
              : runtime->get<long long>() <= 0 || runtime->get<long long>() > 100LL * 365 * 86400) {
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

namespace {

// The five channel ports of a connection file: each required, each different.
std::optional<ApiError> parse_ports(const ObjectReader& in, HubConnection& c) {
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
  return std::nullopt;
}

}  // namespace

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
  boost::asio::ip::make_address(*ip, ec);
  if (ec)
    return ApiError{http::status::bad_request,
                    "connection.ip \"" + printable(*ip, kQuoteLimit) + "\" is not an IP address",
                    "connection.ip",
                    {}};
  c.ip = *ip;
  if (auto e = parse_ports(in, c)) return e;
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

json credentials_json(const std::string& user, const auth::CredentialsStore::Info& info) {
  const char* status = info.status == auth::CredentialsStore::Status::valid     ? "valid"
                       : info.status == auth::CredentialsStore::Status::expired ? "expired"
                                                                                : "missing";
  return json{
      {"user", user},
      {"status", status},
      {"expires_at", info.expires_at ? json(format_time_utc(*info.expires_at)) : json(nullptr)},
      {"updated_at", info.status == auth::CredentialsStore::Status::missing
                         ? json(nullptr)
                         : json(format_time_utc(info.updated_at))}};
}

namespace {

// The token: a non-empty string of printable, non-blank ASCII (it goes into an HTTP header).
std::optional<ApiError> read_token(const ObjectReader& in, const json*& token) {
  token = in.get("token");
  if (!token) return ApiError{http::status::bad_request, "token is required", "token", {}};
  if (!token->is_string()) return in.wrong_type("token", "a string");
  const std::string& text = token->get_ref<const std::string&>();
  if (text.empty())
    return ApiError{http::status::bad_request, "token must not be empty", "token", {}};
  for (char c : text) {
    if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) == 0x7f) {
      return ApiError{http::status::bad_request,
                      "token contains whitespace or a control character",
                      "token",
                      {}};
    }
  }
  return std::nullopt;
}

// expires_at, if given: RFC 3339 or Unix seconds, in the future and before the year 2200.
std::optional<ApiError> read_expires_at(const ObjectReader& in,
                                        std::optional<Clock::time_point>& expires) {
  const json* e = in.get("expires_at");
  if (!e) return std::nullopt;
  if (e->is_number()) {
    // Unix seconds before the year 2200: Clock holds nanoseconds in 64 bits (until 2262).
    constexpr double kMaxUnixSeconds = 7258118399.0;
    const double seconds = e->get<double>();
    if (!(seconds >= 0 && seconds <= kMaxUnixSeconds))
      return ApiError{
          http::status::bad_request,
          "expires_at must be Unix seconds between 0 and 7258118399 (2199), or RFC 3339",
          "expires_at",
          {}};
    expires = Clock::time_point(std::chrono::seconds(static_cast<long long>(seconds)));
  } else if (e->is_string()) {
    expires = parse_time_utc(e->get<std::string>());
    if (!expires)
      return ApiError{
          http::status::bad_request,
          "expires_at must be RFC 3339 (2026-11-26T18:00:00Z, before 2200) or Unix seconds",
          "expires_at",
          {}};
  } else {
    return in.wrong_type("expires_at", "an RFC 3339 string or Unix seconds");
  }
  if (*expires <= Clock::now()) {
    return ApiError{http::status::unprocessable_entity,
                    "expires_at is in the past: the token has expired already",
                    "expires_at",
                    {}};
  }
  return std::nullopt;
}

}  // namespace

std::variant<CredentialsUpdate, ApiError> parse_credentials(const std::string& text) {
  json body = json::parse(text, nullptr, false);
  if (body.is_discarded())
    return ApiError{http::status::bad_request, "the body is not valid JSON", {}, {}};
  if (!body.is_object())
    return ApiError{http::status::bad_request, "the body must be a JSON object", {}, {}};
  ObjectReader in(body, "");
  if (auto e = in.check_known({"token", "expires_at"})) return *e;
  const json* token = nullptr;
  if (auto e = read_token(in, token)) return *e;
  CredentialsUpdate update;
  if (auto e = read_expires_at(in, update.expires_at)) return *e;
  update.token = token->get<std::string>();
  return update;
}

}  // namespace kb::bridge
