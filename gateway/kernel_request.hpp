#pragma once
// What the gateway's REST requests carry, read strictly (docs/gateway.md): the body of
// POST /api/kernels, the environment whitelist that body's "env" goes through (jupyter_server
// sends its whole process environment, hub tokens included: reference H3), the resources a user
// may override with KERNEL_* variables, and the kernelspec a GET /api/kernelspecs… names,
// including the client's "?user=alice/python3" form (reference 1b). Every refusal is an
// HttpError whose message names the field or variable. Pure functions, callable from any thread.
#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "gateway/kernel_model.hpp"

namespace kb::gateway {

template <class T>
using HttpResult = std::variant<T, HttpError>;

struct StartRequestLimits {
  std::size_t max_body = 1024 * 1024;  // a whole process environment fits many times
  std::size_t max_variables = 4096;
  std::size_t max_value = 64 * 1024;
};

// POST /api/kernels {"name": N or null, "env": {string: string}}. An empty body is {}.
struct StartRequest {
  std::optional<std::string> name;  // nullopt: the default kernelspec
  std::map<std::string, std::string> env;
};
HttpResult<StartRequest> parse_start_request(std::string_view body,
                                             const StartRequestLimits& limits = {});

// Which variables of a request's env reach the kernel's job: KERNEL_* and the configured
// `extra_names`, but never a name that looks like a credential (looks_secret), configured or not.
struct EnvPolicy {
  std::set<std::string> extra_names;
};
// Contains TOKEN, SECRET or PASSWORD in any case (JUPYTERHUB_API_TOKEN,
// JUPYTER_GATEWAY_AUTH_TOKEN…).
bool looks_secret(std::string_view name);

struct FilteredEnv {
  std::map<std::string, std::string> passed;
  // Names left out that the policy would otherwise pass, each with why; for one log line. Values
  // are never kept here: they may be secrets.
  std::vector<std::pair<std::string, std::string>> refused;
  std::size_t dropped = 0;  // names outside the whitelist, silently expected (the whole environ)
};
FilteredEnv filter_env(const std::map<std::string, std::string>& env, const EnvPolicy& policy);

// The resources a user may override per kernel. An empty value counts as unset.
struct ResourceOverrides {
  std::optional<std::string> project;           // KERNEL_PROJECT
  std::optional<std::string> partition;         // KERNEL_PARTITION
  std::optional<int> nodes;                     // KERNEL_NODES, 1 to 1000000
  std::optional<int> gpus;                      // KERNEL_GPUS (per node), 0 to 1024
  std::optional<std::chrono::seconds> runtime;  // KERNEL_RUNTIME: "3600", "90min", "2h30m", "1d"
  std::optional<std::string> reservation;       // KERNEL_RESERVATION
  bool empty() const;
};
// Reads the KERNEL_* resource variables of `env`; a value that does not parse is a 400 naming the
// variable and what it must be. Whether the site allows the values is the caller's check.
HttpResult<ResourceOverrides> resource_overrides(const std::map<std::string, std::string>& env);

// A run time: seconds ("3600") or units from larger to smaller ("2h30m", "90min", "1d", "45s").
std::optional<std::chrono::seconds> parse_runtime(std::string_view text);

// GET /api/kernelspecs, /api/kernelspecs/{name}, and the client's mangled
// /api/kernelspecs?user=alice/python3 (the name after the last "/" of user). `path` starts at
// the gateway's root ("/api/kernelspecs…"), `query` is the raw text after "?".
struct KernelspecTarget {
  std::optional<std::string> name;  // nullopt: the list
  std::optional<std::string> user;  // the ?user= filter, if any (never an identity)
};
HttpResult<KernelspecTarget> parse_kernelspec_target(std::string_view path, std::string_view query);

// %XX decoding; `plus_is_space` for query values. nullopt on a malformed escape.
std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space);

}  // namespace kb::gateway
