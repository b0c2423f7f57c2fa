// `kernel-bridge config check FILE`: validates a configuration file the way `serve` will read it,
// without starting anything. Runs on the main thread before any io_context exists.
#include <cstdio>
#include <string>

#include "bridge/config.hpp"
#include "cli/commands.hpp"

namespace kb::bridge {

void add_config_commands(CLI::App& app) {
  auto* config = app.add_subcommand("config", "Work with the bridge's configuration file");
  config->require_subcommand(1);
  auto* check = config->add_subcommand(
      "check",
      "Check a configuration file (syntax, unknown keys, values, referenced files and their "
      "permissions); exit 0 if valid, 2 with \"file:line: what is wrong\" if not");
  struct Options {
    std::string file;
    bool no_files = false;
  };
  auto options = std::make_shared<Options>();
  check
      ->add_option("FILE", options->file,
                   "The configuration file, e.g. /etc/kernel-bridge/kernel-bridge.toml")
      ->required();
  check->add_flag("--no-files", options->no_files,
                  "Do not check referenced files (when checking a file meant for another machine)");
  check->callback([options] {
    try {
      const BridgeConfig config =
          load_config(options->file, LoadOptions{.check_files = !options->no_files});
      std::string sites;
      for (const auto& site : config.sites) sites += (sites.empty() ? "" : ", ") + site.name;
      std::printf("%s: valid (%zu site%s: %s)\n", config.file.c_str(), config.sites.size(),
                  config.sites.size() == 1 ? "" : "s", sites.c_str());
      for (const auto& site : config.sites) {
        if (!site.verify_tls) {
          std::printf(
              "warning: site %s: verify_tls = false — UNICORE's certificate is not checked (test "
              "sites only)\n",
              site.name.c_str());
        }
      }
    } catch (const ConfigError& e) {
      std::fprintf(stderr, "%s\n", e.what());
      throw ExitStatus{2};
    }
  });
}

}  // namespace kb::bridge
