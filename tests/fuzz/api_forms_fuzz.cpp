// libFuzzer target: the control API's request-body readers (bridge/api_forms.cpp) on their own:
// the credentials body (parse_credentials, with its RFC 3339 parse_time_utc) and the create
// request's "resources" and "connection" objects (parse_resources, parse_connection). The input is
// the body. control_api_fuzz reaches these only through whole HTTP requests whose Content-Length
// must match the body, so it covers a fifth of their branches in a minute; here every mutation is
// a new body.
// Invariants: no exception (the body is parsed as POST /v1/kernels parses it), no crash; errors
// are 400 or 422 with a message and never quote the token; accepted values are within the
// documented ranges (docs/control-api.md) and resources print (resources_json) and read back to
// the same request; parse_time_utc accepts exactly the RFC 3339 times of the years 1970 to 2199.
#include <boost/asio/ip/address.hpp>
#include <nlohmann/json.hpp>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

#include "bridge/api_forms.hpp"

namespace {

using namespace kb::bridge;
using json = nlohmann::json;
namespace http = boost::beast::http;

[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "api_forms_fuzz: invariant broken: %s\n", what);
  std::abort();
}

void check_error(const ApiError& e, const char* field_prefix) {
  if (e.status != http::status::bad_request && e.status != http::status::unprocessable_entity)
    broken("a body error that is neither 400 nor 422");
  if (e.message.empty()) broken("an error without a message");
  if (field_prefix && !e.field.empty() && e.field.rfind(field_prefix, 0) != 0)
    broken("an error naming a field outside its object");
  (void)dump_json(error_body(e));
}

// RFC 3339 (section 5.6) date-time: YYYY-MM-DDTHH:MM:SS[.frac](Z|z|+HH:MM|-HH:MM), with the day
// valid in its month; a leap second (:60) allowed.
bool is_rfc3339(const std::string& t, int& year) {
  auto num = [&t](std::size_t at, std::size_t n, int& out) {
    if (t.size() < at + n) return false;
    out = 0;
    for (std::size_t i = at; i < at + n; ++i) {
      if (!std::isdigit(static_cast<unsigned char>(t[i]))) return false;
      out = out * 10 + (t[i] - '0');
    }
    return true;
  };
  int month, day, hour, minute, second;
  if (!num(0, 4, year) || t[4] != '-' || !num(5, 2, month) || t[7] != '-' || !num(8, 2, day) ||
      t[10] != 'T' || !num(11, 2, hour) || t[13] != ':' || !num(14, 2, minute) || t[16] != ':' ||
      !num(17, 2, second))
    return false;
  static const int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
  if (month < 1 || month > 12 || day < 1 || day > kDays[month - 1] + (month == 2 && leap ? 1 : 0) ||
      hour > 23 || minute > 59 || second > 60)
    return false;
  std::size_t i = 19;
  if (i < t.size() && t[i] == '.') {
    const std::size_t start = ++i;
    while (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) ++i;
    if (i == start) return false;
  }
  if (i + 1 == t.size() && (t[i] == 'Z' || t[i] == 'z')) return true;
  int oh, om;
  return i + 6 == t.size() && (t[i] == '+' || t[i] == '-') && num(i + 1, 2, oh) &&
         t[i + 3] == ':' && num(i + 4, 2, om) && oh <= 23 && om <= 59;
}

void check_time(const std::string& text) {
  const auto parsed = parse_time_utc(text);
  int year = 0;
  const bool valid = is_rfc3339(text, year) && year >= 1970 && year < 2200;
  if (parsed && !valid) broken("parse_time_utc accepted what is not an RFC 3339 time");
  if (!parsed && valid) broken("parse_time_utc refused an RFC 3339 time");
}

void check_credentials(const std::string& text, const json* body) {
  const auto parsed = parse_credentials(text);
  if (const auto* e = std::get_if<ApiError>(&parsed)) {
    check_error(*e, nullptr);
    // The body holds a secret: no error quotes it.
    const json* token =
        body && body->is_object() && body->contains("token") ? &(*body)["token"] : nullptr;
    if (token && token->is_string() && token->get_ref<const std::string&>().size() >= 8 &&
        e->message.find(token->get_ref<const std::string&>()) != std::string::npos)
      broken("an error quotes the token");
    return;
  }
  const auto& update = std::get<CredentialsUpdate>(parsed);
  if (update.token.empty()) broken("an empty token accepted");
  for (char c : update.token) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x21 || u == 0x7f) broken("a token with whitespace or a control character accepted");
  }
  if (update.expires_at && format_time_utc(*update.expires_at).rfind("2", 0) != 0)
    broken("an expiry outside 2000 to 2199 accepted");
}

bool same(const ResourceRequest& a, const ResourceRequest& b) {
  return a.queue == b.queue && a.nodes == b.nodes && a.gpus == b.gpus && a.runtime == b.runtime &&
         a.project == b.project && a.reservation == b.reservation && a.qos == b.qos &&
         a.memory == b.memory;
}

void check_resources(const json& j) {
  ResourceRequest r;
  if (auto e = parse_resources(j, r)) return check_error(*e, "resources");
  if (r.nodes && (*r.nodes < 1 || *r.nodes > 1000000)) broken("nodes out of range");
  if (r.gpus && (*r.gpus < 0 || *r.gpus > 1024)) broken("gpus out of range");
  if (r.runtime && (r.runtime->count() <= 0 || r.runtime->count() > 100LL * 365 * 86400))
    broken("runtime out of range");
  for (const auto* s : {&r.queue, &r.project, &r.reservation, &r.qos}) {
    if (!*s) continue;
    if ((*s)->empty()) broken("an empty string accepted");
    for (char c : **s) {
      if (static_cast<unsigned char>(c) < 0x20) broken("a control character accepted");
    }
  }
  // What GET /v1/kernels shows reads back to the same request. format_size prints a size that is
  // no multiple of 1024 as plain bytes ("100"), which a request sends as a number.
  json shown = json::parse(dump_json(resources_json(r)));
  if (shown.contains("memory") && r.memory && *r.memory % 1024 != 0) shown["memory"] = *r.memory;
  ResourceRequest again;
  if (auto e = parse_resources(shown, again)) broken("resources_json does not read back");
  if (!same(r, again)) broken("resources_json reads back to another request");
}

void check_connection(const json& j) {
  HubConnection c;
  if (auto e = parse_connection(j, c)) return check_error(*e, "connection");
  const std::set<int> ports{c.shell_port, c.iopub_port, c.stdin_port, c.control_port, c.hb_port};
  if (ports.size() != 5 || ports.count(0)) broken("connection ports missing or shared");
  boost::system::error_code ec;
  boost::asio::ip::make_address(c.ip, ec);
  if (ec) broken("connection.ip is not an address");
  if (c.transport != "tcp" || c.signature_scheme.rfind("hmac-", 0) != 0)
    broken("transport or signature scheme not as documented");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  if (size <= 64) check_time(text);  // an expires_at value as it comes

  // The body as POST /v1/kernels reads it (api_create_kernel.cpp: parse_body).
  json body;
  bool parsed = false;
  try {
    body = json::parse(text);
    parsed = true;
  } catch (const json::exception&) {
  }
  check_credentials(text, parsed ? &body : nullptr);
  if (!parsed || !body.is_object()) return 0;
  if (auto it = body.find("expires_at"); it != body.end() && it->is_string())
    check_time(it->get<std::string>());
  check_resources(body.contains("resources") ? body["resources"] : body);
  check_connection(body.contains("connection") ? body["connection"] : body);
  return 0;
}
