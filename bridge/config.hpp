#pragma once
// The bridge's configuration file (TOML; schema in docs/configuration.md, sample in
// etc/kernel-bridge.toml) parsed into plain structs, and the checks of a kernel request against a
// site's limits. load_config() runs at start-up (throws ConfigError); the rest are pure functions
// callable from any thread.
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "common/config_error.hpp"

#include "bridge/kernel_service.hpp"

namespace kb::bridge {

// ConfigError (common/config_error.hpp): what load_config() throws.
using kb::ConfigError;

struct HostPort {
  std::string host;
  std::uint16_t port = 0;
  std::string str() const;  // "host:port", IPv6 as "[::1]:22"
};

struct AgentConfig {
  enum class Mode { installed, upload };
  Mode mode = Mode::installed;
  // installed: the agent executable's path on the site (not checked locally).
  // upload: the local executable staged into each job (default: this kernel-bridge binary).
  std::string path;
};

enum class GpuMode { gpus_per_node, batch_lines };

// Resources a request may leave out; the site's values fill the gaps.
struct ResourceDefaults {
  std::optional<std::string> queue;
  std::optional<int> nodes;
  std::optional<int> gpus;
  std::optional<std::chrono::seconds> runtime;
  std::optional<std::string> project;
  std::optional<std::string> reservation;
  std::optional<std::string> qos;
  std::optional<std::uint64_t> memory;
};

struct ResourceLimits {
  std::vector<std::string> queues;  // empty: any queue
  std::optional<int> max_nodes;
  std::optional<int> max_gpus;  // per node
  std::optional<std::chrono::seconds> max_runtime;
  std::optional<std::uint64_t> max_memory;  // bytes per node
};

// One of the site's partitions (Slurm partition = UNICORE queue) and what a request on it may ask
// for. A limit or default it leaves out is the site's ([site.limits], [site.defaults]).
struct PartitionConfig {
  std::string name;
  std::string description;    // for people choosing one ("GPU nodes, 4 A100 each")
  ResourceLimits limits;      // `queues` unused
  ResourceDefaults defaults;  // nodes, gpus, runtime, memory
  int line = 0;
};

struct SiteConfig {
  std::string name;
  std::string description;
  std::string unicore_url;  // base URL ending in /rest/core
  std::string ca_file;      // empty: the system's CA store
  bool verify_tls = true;
  std::vector<HostPort> login_hosts;  // tried in order
  std::string known_hosts;
  std::string ssh_user;
  std::string ssh_identity;
  std::string ssh_cipher;  // empty: libssh's default list
  std::chrono::seconds ssh_keepalive{15};
  std::chrono::seconds connect_timeout{10};
  AgentConfig agent;
  GpuMode gpu_mode = GpuMode::gpus_per_node;
  // Shell lines run by the job; {agent} expands to the agent's command line (which itself runs the
  // kernel), {kernel_argv} to the kernel's argv, shell-quoted. Empty: the job runs {agent}
  // directly.
  std::string job_template;
  std::map<std::string, std::string> environment;           // exported in the job
  std::vector<std::string> job_tags{"kernel-bridge"};       // on every job, so operators find them
  std::map<std::string, std::vector<std::string>> kernels;  // name → argv with {connection_file}
  std::string default_kernel;  // used when a request names neither kernel nor argv
  ResourceDefaults defaults;
  ResourceLimits limits;
  // [[site.partitions]]: when given, a request's queue must be one of them and each brings its
  // own limits and defaults (docs/configuration.md).
  std::vector<PartitionConfig> partitions;
  // Reservations a request may name; empty: any (the site's scheduler decides).
  std::vector<std::string> reservations;
  int line = 0;  // where the [[site]] table starts (for later messages)
};

struct ApiConfig {
  std::string unix_socket;      // empty: no Unix listener
  std::optional<HostPort> tcp;  // needs tokens_file
  std::string tokens_file;
  std::vector<std::string> admin_users;  // Unix-socket users with the admin right
  std::uint64_t max_body = 1024 * 1024;
  std::chrono::seconds header_timeout{5};  // a new connection's request header must arrive by then
  std::chrono::seconds read_timeout{30};   // the body, once the header is in
  std::chrono::seconds idle_timeout{120};  // between keep-alive requests
  std::size_t max_connections = 1024;      // per listener; the last 64 (or 1/8) kept for admins
  std::size_t max_connections_per_user = 64;  // per uid / token user; admins exempt
  std::chrono::seconds max_wait{60};          // upper bound of a long poll (?wait=)
};

// What SIGTERM/SIGINT (`systemctl stop` and `restart`) does to the kernels.
enum class OnStop {
  // Shut every kernel down and abort its job (the bridge is gone for good).
  end_kernels,
  // Leave kernels, agents and jobs running; the next start re-attaches them from the state
  // database. Without a next start the agents end their jobs after their no-bridge timeout.
  keep_kernels,
};

struct BridgeConfig {
  std::string file;       // absolute path of the file read
  std::string state_dir;  // holds state.db (docs/state.md)
  std::string log_level = "info";
  std::chrono::seconds restart_grace{30};
  std::chrono::seconds ended_retention{3600};  // ended kernels stay listed this long
  int max_kernels_per_user = 0;                // 0: unlimited
  OnStop on_stop = OnStop::end_kernels;
  ApiConfig api;
  std::vector<SiteConfig> sites;

  const SiteConfig* find_site(std::string_view name) const;
};

// A configuration file larger than this is refused unread (a real one is a few KiB; the limit keeps
// `serve --config /dev/zero`-like mistakes from eating memory).
inline constexpr std::size_t kMaxConfigBytes = 1024 * 1024;

struct LoadOptions {
  // Check that referenced files exist with safe permissions (identity, known_hosts, ca_file,
  // tokens_file, upload agent). Off only for `config check --no-files` on another machine.
  bool check_files = true;
};

// Reads and validates the file. Relative paths in it are resolved against the file's directory.
BridgeConfig load_config(const std::string& path, const LoadOptions& options = {});
// The same from text (tests); `file` names it in messages and anchors relative paths.
BridgeConfig parse_config(std::string_view text, const std::string& file,
                          const LoadOptions& options = {});

// "30s", "15m", "1h", "2h30m", "1d", "1d12h" → seconds. Errors say what is expected.
std::optional<std::chrono::seconds> parse_duration(std::string_view text,
                                                   std::string* error = nullptr);
std::string format_duration(std::chrono::seconds d);  // "48h", "2h30m", "45s", "0s"
// "512M", "16G", "16GiB", "1T" → bytes; units are powers of 1024 (as Slurm reads them).
std::optional<std::uint64_t> parse_size(std::string_view text, std::string* error = nullptr);
std::string format_size(std::uint64_t bytes);  // largest exact unit: "16G", "1536M", "100"

// A request outside the site's limits: which field, which limit, a sentence for the person.
struct LimitViolation {
  std::string field;    // "resources.runtime"
  std::string limit;    // "max_runtime"
  std::string message;  // "runtime 48h exceeds the site's max_runtime 24h"
};

// Fills resources the request left out: the queue from the site's defaults, then the rest from its
// partition's defaults, then from the site's.
void apply_defaults(const SiteConfig& site, ResourceRequest& resources);
// The partition of that name, or null.
const PartitionConfig* find_partition(const SiteConfig& site, std::string_view name);
// The queues a request may name: the partitions' names, else [site.limits] queues (empty: any).
std::vector<std::string> allowed_queues(const SiteConfig& site);
// What applies on `queue`: each limit of its partition where set, else the site's.
ResourceLimits effective_limits(const SiteConfig& site, const std::optional<std::string>& queue);
// The first limit the request's resources violate (check after apply_defaults), or nullopt.
std::optional<LimitViolation> validate_request(const SiteConfig& site,
                                               const KernelRequest& request);

// The closest candidate to `word` (edit distance ≤ 2, or a prefix), empty if none: "did you mean".
std::string closest_match(std::string_view word, const std::vector<std::string>& candidates);

}  // namespace kb::bridge
