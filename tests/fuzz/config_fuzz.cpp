// libFuzzer target: the bridge's configuration parser (bridge/config.cpp), through parse_config(),
// the function load_config() hands the file's text to, with file checks off (what `config check
// --no-files` does: a fuzz run must not depend on the files of the machine it runs on). The input
// is the TOML text, up to the size load_config() reads (kMaxConfigBytes).
// Invariants: every input ends in a BridgeConfig or a ConfigError naming the file; no other
// exception, no crash, no sanitizer report; and an accepted configuration holds what the parser
// promises (docs/configuration.md): at least one site with unique names, a listener, login hosts
// with ports, kernels with {connection_file}, defaults inside the limits, durations and sizes that
// print and parse back to themselves.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <set>
#include <string>
#include <string_view>

#include "bridge/config.hpp"

namespace {

using namespace kb::bridge;

constexpr const char* kFile = "/fuzz/etc/kernel-bridge.toml";

[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "config_fuzz: invariant broken: %s\n", what);
  std::abort();
}

void check_duration(std::chrono::seconds d) {
  if (d.count() < 0) broken("negative duration");
  std::string error;
  const auto again = parse_duration(format_duration(d), &error);
  if (!again || *again != d) broken("a duration does not print and parse back to itself");
}

void check_size(std::uint64_t bytes) {
  std::string text = format_size(bytes);  // "16G", or plain bytes ("100") that need a unit back
  if (text.back() >= '0' && text.back() <= '9') text += "B";
  const auto again = parse_size(text);
  if (!again || *again != bytes) broken("a size does not print and parse back to itself");
}

void check_site(const SiteConfig& site) {
  if (site.name.empty()) broken("a site without a name");
  if (site.login_hosts.empty()) broken("a site without login hosts");
  for (const auto& hp : site.login_hosts) {
    if (hp.host.empty() || hp.port == 0) broken("a login host without host or port");
  }
  if (site.unicore_url.rfind("http", 0) != 0) broken("unicore_url is not http(s)");
  if (site.agent.path.empty() && site.agent.mode == AgentConfig::Mode::installed)
    broken("an installed agent without a path");
  for (const auto& [name, argv] : site.kernels) {
    bool placeholder = false;
    for (const auto& a : argv) placeholder |= a.find("{connection_file}") != std::string::npos;
    if (argv.empty() || !placeholder) broken("a kernel without {connection_file}");
  }
  if (!site.default_kernel.empty() && !site.kernels.count(site.default_kernel))
    broken("default_kernel is not a kernel");
  KernelRequest probe;
  apply_defaults(site, probe.resources);
  if (validate_request(site, probe)) broken("the site's defaults violate its limits");
  check_duration(site.ssh_keepalive);
  check_duration(site.connect_timeout);
  if (site.defaults.runtime) check_duration(*site.defaults.runtime);
  if (site.limits.max_runtime) check_duration(*site.limits.max_runtime);
  if (site.defaults.memory) check_size(*site.defaults.memory);
  if (site.limits.max_memory) check_size(*site.limits.max_memory);
}

void check_config(const BridgeConfig& config) {
  if (config.file != kFile) broken("the config does not name its file");
  if (config.state_dir.empty()) broken("no state_dir");
  if (config.sites.empty()) broken("no site");
  if (config.api.unix_socket.empty() && !config.api.tcp) broken("no listener");
  if (config.api.tcp && config.api.tokens_file.empty()) broken("tcp without tokens_file");
  if (config.api.max_body < 1024) broken("max_body below 1K");
  check_size(config.api.max_body);
  for (auto d : {config.restart_grace, config.ended_retention, config.api.header_timeout,
                 config.api.read_timeout, config.api.idle_timeout, config.api.max_wait})
    check_duration(d);
  std::set<std::string> names;
  for (const auto& site : config.sites) {
    if (!names.insert(site.name).second) broken("two sites with one name");
    if (config.find_site(site.name) != &site) broken("find_site does not find a site");
    check_site(site);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > kMaxConfigBytes) return 0;  // load_config refuses these unread
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  LoadOptions options;
  options.check_files = false;
  try {
    check_config(parse_config(text, kFile, options));
  } catch (const ConfigError& e) {
    if (e.file != kFile || e.message.empty()) broken("a ConfigError without file or message");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "config_fuzz: unexpected exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
