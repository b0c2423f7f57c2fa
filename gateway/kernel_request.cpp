#include "gateway/kernel_request.hpp"

#include <nlohmann/json.hpp>

#include "common/text.hpp"

namespace kb::gateway {

namespace {

using json = nlohmann::json;

constexpr long long kMaxRuntime = 100LL * 365 * 86400;  // 100 years, as the control API allows

HttpError bad(std::string message) {
  return {400, std::move(message)};
}

bool is_identifier(std::string_view name) {
  if (name.empty() || (name[0] >= '0' && name[0] <= '9')) return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
      return false;
  }
  return true;
}

bool has_control(std::string_view text) {
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) return true;
  }
  return false;
}

std::string quoted(std::string_view name, std::string_view value) {
  return std::string(name) + "=\"" + printable(value, 64) + "\"";
}

}  // namespace

HttpResult<StartRequest> parse_start_request(std::string_view body,
                                             const StartRequestLimits& limits) {
  if (body.size() > limits.max_body)
    return HttpError{413, "the request body has " + std::to_string(body.size()) +
                              " bytes, more than " + std::to_string(limits.max_body)};
  StartRequest request;
  if (body.find_first_not_of(" \t\r\n") == std::string_view::npos) return request;
  // nlohmann's parser takes a NUL byte for the end of input; JSON text never holds a raw one.
  const json j = body.find('\0') == std::string_view::npos
                     ? json::parse(body, nullptr, /*allow_exceptions=*/false)
                     : json(json::value_t::discarded);
  if (j.is_discarded()) return bad("the request body is not JSON (or not UTF-8)");
  if (!j.is_object()) return bad("the request body must be a JSON object");
  if (const auto it = j.find("name"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) return bad("\"name\" must be a kernelspec name or null");
    const auto& name = it->get_ref<const std::string&>();
    if (!valid_kernelspec_name(name))
      return bad("\"name\": \"" + printable(name, 64) + "\" is not a kernelspec name");
    request.name = name;
  }
  const auto env = j.find("env");
  if (env == j.end() || env->is_null()) return request;
  if (!env->is_object()) return bad("\"env\" must be an object of strings");
  if (env->size() > limits.max_variables)
    return HttpError{413, "\"env\" has " + std::to_string(env->size()) + " variables, more than " +
                              std::to_string(limits.max_variables)};
  for (const auto& [name, value] : env->items()) {
    if (!value.is_string()) return bad("env." + printable(name, 64) + " must be a string");
    const auto& text = value.get_ref<const std::string&>();
    if (text.size() > limits.max_value)
      return HttpError{413, "env." + printable(name, 64) + " is longer than " +
                                std::to_string(limits.max_value) + " bytes"};
    request.env.emplace(name, text);
  }
  return request;
}

bool looks_secret(std::string_view name) {
  std::string upper(name);
  for (auto& c : upper) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  for (std::string_view word : {"TOKEN", "SECRET", "PASSWORD"}) {
    if (upper.find(word) != std::string::npos) return true;
  }
  return false;
}

FilteredEnv filter_env(const std::map<std::string, std::string>& env, const EnvPolicy& policy) {
  FilteredEnv out;
  for (const auto& [name, value] : env) {
    if (name.rfind("KERNEL_", 0) != 0 && !policy.extra_names.count(name)) {
      ++out.dropped;
      continue;
    }
    const std::string shown = printable(name, 64);
    if (looks_secret(name))
      out.refused.emplace_back(shown, "looks like a credential, which never reaches a kernel");
    else if (!is_identifier(name))
      out.refused.emplace_back(shown, "is not a variable name");
    else if (has_control(value))
      out.refused.emplace_back(shown, "has a control character in its value");
    else
      out.passed.emplace(name, value);
  }
  return out;
}

bool ResourceOverrides::empty() const {
  return !project && !partition && !nodes && !gpus && !runtime && !reservation;
}

std::optional<std::chrono::seconds> parse_runtime(std::string_view text) {
  if (text.empty()) return std::nullopt;
  if (text.find_first_not_of("0123456789") == std::string_view::npos) {
    if (text.size() > 10) return std::nullopt;
    const long long s = std::stoll(std::string(text));
    if (s > kMaxRuntime) return std::nullopt;
    return std::chrono::seconds(s);
  }
  static constexpr struct {
    std::string_view unit;
    long long seconds;
  } kUnits[] = {{"d", 86400}, {"h", 3600}, {"min", 60}, {"m", 60}, {"s", 1}};
  long long total = 0;
  int last_rank = -1;  // d=0, h=1, m=2, s=3: each at most once, larger first
  std::size_t i = 0;
  while (i < text.size()) {
    const std::size_t start = i;
    long long number = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      number = number * 10 + (text[i] - '0');
      if (number > kMaxRuntime) return std::nullopt;
      ++i;
    }
    if (i == start) return std::nullopt;
    int rank = -1;
    for (const auto& u : kUnits) {
      if (text.substr(i, u.unit.size()) == u.unit) {
        rank = u.seconds == 86400 ? 0 : u.seconds == 3600 ? 1 : u.seconds == 60 ? 2 : 3;
        total += number * u.seconds;
        i += u.unit.size();
        break;
      }
    }
    if (rank <= last_rank || total > kMaxRuntime) return std::nullopt;
    last_rank = rank;
  }
  return std::chrono::seconds(total);
}

HttpResult<ResourceOverrides> resource_overrides(const std::map<std::string, std::string>& env) {
  auto get = [&env](const char* name) -> std::optional<std::string_view> {
    const auto it = env.find(name);
    if (it == env.end() || it->second.empty()) return std::nullopt;
    return it->second;
  };
  ResourceOverrides r;
  const std::pair<const char*, std::optional<std::string>*> names[] = {
      {"KERNEL_PROJECT", &r.project},
      {"KERNEL_PARTITION", &r.partition},
      {"KERNEL_RESERVATION", &r.reservation}};
  for (const auto& [var, out] : names) {
    const auto value = get(var);
    if (!value) continue;
    bool ok = value->size() <= 128;
    for (char c : *value) {
      ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  std::string_view("_.-+:@").find(c) != std::string_view::npos);
    }
    if (!ok)
      return bad(quoted(var, *value) +
                 " is not a name: use letters, digits and _ . - + : @, at most 128");
    *out = std::string(*value);
  }
  const struct {
    const char* var;
    std::optional<int>* out;
    int min, max;
  } numbers[] = {{"KERNEL_NODES", &r.nodes, 1, 1000000}, {"KERNEL_GPUS", &r.gpus, 0, 1024}};
  for (const auto& n : numbers) {
    const auto value = get(n.var);
    if (!value) continue;
    const bool digits =
        value->size() <= 7 && value->find_first_not_of("0123456789") == std::string_view::npos;
    const int parsed = digits ? std::stoi(std::string(*value)) : -1;
    if (!digits || parsed < n.min || parsed > n.max)
      return bad(quoted(n.var, *value) + " is not a whole number from " + std::to_string(n.min) +
                 " to " + std::to_string(n.max));
    *n.out = parsed;
  }
  if (const auto value = get("KERNEL_RUNTIME")) {
    r.runtime = parse_runtime(*value);
    if (!r.runtime || r.runtime->count() < 1)
      return bad(quoted("KERNEL_RUNTIME", *value) +
                 " is not a run time: write seconds (3600) or e.g. 90min, 2h30m, 1d");
  }
  return r;
}

std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space) {
  auto hex = [](char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
  };
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%') {
      if (i + 2 >= text.size()) return std::nullopt;
      const int hi = hex(text[i + 1]), lo = hex(text[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else {
      out.push_back(plus_is_space && text[i] == '+' ? ' ' : text[i]);
    }
  }
  return out;
}

HttpResult<KernelspecTarget> parse_kernelspec_target(std::string_view path,
                                                     std::string_view query) {
  constexpr std::string_view kPrefix = "/api/kernelspecs";
  if (path.substr(0, kPrefix.size()) != kPrefix) return HttpError{404, "not a kernelspecs path"};
  KernelspecTarget target;
  while (!query.empty()) {
    const auto amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    const auto eq = pair.find('=');
    if (pair.substr(0, eq) == "user" && !target.user) {
      const auto value =
          percent_decode(eq == std::string_view::npos ? "" : pair.substr(eq + 1), true);
      if (!value) return bad("the user parameter has a malformed %-escape");
      target.user = *value;
    }
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  std::string_view rest = path.substr(kPrefix.size());
  std::string name;
  if (rest.empty() || rest == "/") {
    // The client appends "/{name}" to a URL that already ends in "?user=alice" (reference 1b).
    if (!target.user) return target;
    const auto slash = target.user->rfind('/');
    if (slash == std::string::npos) return target;
    name = target.user->substr(slash + 1);
    target.user->resize(slash);
  } else {
    if (rest[0] != '/') return HttpError{404, "not a kernelspecs path"};
    rest.remove_prefix(1);
    if (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
    if (!valid_kernelspec_name(rest))
      return HttpError{404, "\"" + printable(rest, 64) + "\" is not a kernelspec name"};
    const auto decoded = percent_decode(rest, false);
    if (!decoded) return bad("the kernelspec name has a malformed %-escape");
    name = *decoded;
  }
  if (!valid_kernelspec_name(name))
    return HttpError{404, "\"" + printable(name, 64) + "\" is not a kernelspec name"};
  target.name = std::move(name);
  return target;
}

}  // namespace kb::gateway
