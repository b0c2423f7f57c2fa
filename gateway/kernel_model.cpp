#include "gateway/kernel_model.hpp"

#include <cstdio>
#include <ctime>
#include <set>

#include "common/text.hpp"

namespace kb::gateway {

namespace {

bool is_word(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

}  // namespace

const char* reason_phrase(int status) {
  switch (status) {
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 409:
      return "Conflict";
    case 413:
      return "Payload Too Large";
    case 415:
      return "Unsupported Media Type";
    case 422:
      return "Unprocessable Entity";
    case 500:
      return "Internal Server Error";
    case 502:
      return "Bad Gateway";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
  }
  return "Error";
}

nlohmann::json error_json(const HttpError& error) {
  return {{"message", printable(error.message, 2048)}, {"reason", reason_phrase(error.status)}};
}

bool valid_kernel_id(std::string_view id) {
  // Five runs of word characters joined by single hyphens, nothing else.
  int groups = 0;
  std::size_t i = 0;
  while (true) {
    const std::size_t start = i;
    while (i < id.size() && is_word(id[i])) ++i;
    if (i == start) return false;
    ++groups;
    if (i == id.size()) return groups == 5;
    if (id[i] != '-' || groups == 5) return false;
    ++i;
  }
}

bool valid_kernelspec_name(std::string_view name) {
  if (name.empty()) return false;
  for (char c : name) {
    if (!is_word(c) && c != '.' && c != '-' && c != '%') return false;
  }
  return true;
}

const char* to_string(ExecutionState state) {
  switch (state) {
    case ExecutionState::unknown:
      return "unknown";
    case ExecutionState::starting:
      return "starting";
    case ExecutionState::idle:
      return "idle";
    case ExecutionState::busy:
      return "busy";
    case ExecutionState::terminating:
      return "terminating";
    case ExecutionState::restarting:
      return "restarting";
    case ExecutionState::autorestarting:
      return "autorestarting";
    case ExecutionState::dead:
      return "dead";
  }
  return "unknown";
}

std::string format_last_activity(std::chrono::system_clock::time_point at) {
  using namespace std::chrono;
  const auto us = floor<microseconds>(at);
  const auto s = floor<seconds>(us);
  const std::time_t t = system_clock::to_time_t(s);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char text[96];  // room for any int the compiler cannot rule out
  std::snprintf(text, sizeof text, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<long long>((us - s).count()));
  return text;
}

nlohmann::json kernel_json(const KernelModel& kernel) {
  nlohmann::json j = {{"id", kernel.id},
                      {"name", kernel.name},
                      {"last_activity", format_last_activity(kernel.last_activity)},
                      {"execution_state", to_string(kernel.execution_state)},
                      {"connections", kernel.connections}};
  if (kernel.reason) j["reason"] = printable(*kernel.reason, 1024);
  return j;
}

nlohmann::json kernels_json(std::span<const KernelModel> kernels) {
  nlohmann::json list = nlohmann::json::array();
  for (const auto& k : kernels) list.push_back(kernel_json(k));
  return list;
}

std::optional<std::string> validate_kernelspecs(std::string_view default_name,
                                                std::span<const KernelSpec> specs) {
  std::set<std::string_view> names;
  for (const auto& s : specs) {
    const std::string which = "kernelspec \"" + printable(s.name, 64) + "\"";
    if (!valid_kernelspec_name(s.name))
      return which + ": a name may contain only letters, digits and _ . - %";
    if (!names.insert(s.name).second) return which + " is listed twice";
    if (s.argv.empty()) return which + ": argv is empty";
    if (s.display_name.empty()) return which + ": display_name is empty";
    if (s.language.empty()) return which + ": language is empty";
    if (s.interrupt_mode != "signal" && s.interrupt_mode != "message")
      return which + ": interrupt_mode must be \"signal\" or \"message\"";
    if (!s.metadata.is_object()) return which + ": metadata must be a JSON object";
    for (const auto& [key, value] : s.resources) {
      if (key.empty() || value.empty()) return which + ": a resource with an empty name or URL";
    }
    // Everything in it goes out as JSON strings, which must be UTF-8.
    bool utf8 = valid_utf8(s.display_name) && valid_utf8(s.language);
    for (const auto& a : s.argv) utf8 = utf8 && valid_utf8(a);
    for (const auto& [key, value] : s.env) utf8 = utf8 && valid_utf8(key) && valid_utf8(value);
    for (const auto& [key, value] : s.resources)
      utf8 = utf8 && valid_utf8(key) && valid_utf8(value);
    if (!utf8) return which + ": a text in it is not UTF-8";
  }
  if (specs.empty()) return std::nullopt;
  if (!names.count(default_name))
    return "the default kernelspec \"" + printable(default_name, 64) + "\" is not listed";
  return std::nullopt;
}

nlohmann::json kernelspec_json(const KernelSpec& spec) {
  nlohmann::json inner = {{"argv", spec.argv},         {"display_name", spec.display_name},
                          {"language", spec.language}, {"env", spec.env},
                          {"metadata", spec.metadata}, {"interrupt_mode", spec.interrupt_mode}};
  nlohmann::json resources = nlohmann::json::object();
  for (const auto& [key, url] : spec.resources) resources[key] = url;
  return {{"name", spec.name}, {"spec", std::move(inner)}, {"resources", std::move(resources)}};
}

nlohmann::json kernelspecs_json(std::string_view default_name, std::span<const KernelSpec> specs) {
  nlohmann::json all = nlohmann::json::object();
  for (const auto& s : specs) all[s.name] = kernelspec_json(s);
  return {{"default", default_name}, {"kernelspecs", std::move(all)}};
}

nlohmann::json api_info_json(std::string_view bridge_version) {
  return {{"version", kServerApiVersion}, {"kernel_bridge", bridge_version}};
}

}  // namespace kb::gateway
