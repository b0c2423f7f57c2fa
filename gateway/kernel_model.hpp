#pragma once
// The gateway's REST replies in the exact forms jupyter_server 1.23's gateway client parses
// (docs/gateway.md; reference H4): kernel models, the kernelspecs list and one kernelspec,
// GET /api, and error bodies. What the requests carry is read in kernel_request.hpp.
// Pure functions, callable from any thread.
#include <nlohmann/json.hpp>

#include <chrono>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kb::gateway {

// A REST error: the status line and the body {"message": …, "reason": …} that Kernel Gateway and
// Enterprise Gateway send (their JSONErrorsMixin).
struct HttpError {
  int status = 400;
  std::string message;  // a sentence for the person; printable, never a secret
};
const char* reason_phrase(int status);  // "Bad Request", "Not Found", …
// {"message": printable message, "reason": the status's reason phrase}
nlohmann::json error_json(const HttpError& error);

// jupyter_server routes kernels by \w+-\w+-\w+-\w+-\w+ (ASCII word characters here): an id that
// does not match would make every route of that kernel 404 on the client's side.
bool valid_kernel_id(std::string_view id);
// jupyter_server routes kernelspecs by [\w.\-%]+.
bool valid_kernelspec_name(std::string_view name);

// The kernel's status as JupyterLab names it (services kernel/kernel.ts Status).
enum class ExecutionState {
  unknown,
  starting,
  idle,
  busy,
  terminating,
  restarting,
  autorestarting,
  dead
};
const char* to_string(ExecutionState state);

struct KernelModel {
  std::string id;    // valid_kernel_id
  std::string name;  // its kernelspec
  std::chrono::system_clock::time_point last_activity;
  ExecutionState execution_state = ExecutionState::starting;
  int connections = 0;                // open WebSockets on this kernel
  std::optional<std::string> reason;  // shown while starting, e.g. "job 123 is queued"
};

// "%Y-%m-%dT%H:%M:%S.%fZ" in UTC: always six digits of microseconds and "Z", the only form the
// gateway client's strptime accepts.
std::string format_last_activity(std::chrono::system_clock::time_point at);
// {"id","name","last_activity","execution_state","connections"} (+ "reason" when set).
nlohmann::json kernel_json(const KernelModel& kernel);
nlohmann::json kernels_json(std::span<const KernelModel> kernels);  // GET /api/kernels: a list

struct KernelSpec {
  std::string name;  // valid_kernelspec_name
  std::vector<std::string> argv;
  std::string display_name;
  std::string language;
  std::map<std::string, std::string> env;
  nlohmann::json metadata = nlohmann::json::object();
  std::string interrupt_mode = "signal";         // or "message"
  std::map<std::string, std::string> resources;  // "logo-64x64" → URL (paths under base_url)
};
// Why `specs` with `default_name` cannot be served, or nothing: invalid names, duplicates, an
// empty argv, display_name or language (JupyterLab drops such specs), an interrupt_mode other than
// signal or message, metadata that is no object, a default that is not among them.
std::optional<std::string> validate_kernelspecs(std::string_view default_name,
                                                std::span<const KernelSpec> specs);
// {"name", "spec": {argv, display_name, language, env, metadata, interrupt_mode}, "resources"}
nlohmann::json kernelspec_json(const KernelSpec& spec);
// GET /api/kernelspecs: {"default": name, "kernelspecs": {name: kernelspec_json}}
nlohmann::json kernelspecs_json(std::string_view default_name, std::span<const KernelSpec> specs);

// The jupyter_server REST API version this front door implements (GET /api's "version").
inline constexpr std::string_view kServerApiVersion = "1.23.3";
// GET /api: {"version": kServerApiVersion, "kernel_bridge": bridge_version}
nlohmann::json api_info_json(std::string_view bridge_version);

}  // namespace kb::gateway
