// The daemon's subcommands on the kernel-bridge command line: `serve` (bridge/serve.hpp), the front
// doors for users and operators (front_commands.cpp) and `config check` (config_commands.cpp).
#include <memory>

#include "bridge/serve.hpp"
#include "cli/commands.hpp"

namespace kb::bridge {

// front_commands.cpp: kernel, kernelspec, list, status, stop, doctor
void add_front_commands(CLI::App& app);
// config_commands.cpp: config check
void add_config_commands(CLI::App& app);

namespace {

void add_serve_command(CLI::App& app) {
  auto options = std::make_shared<ServeOptions>();
  CLI::App* serve = app.add_subcommand(
      "serve",
      "Run the bridge daemon: the control API, and for each kernel its UNICORE job, agent link and "
      "hub-side endpoints (see docs/lifecycle.md). Signals: SIGTERM/SIGINT stop (bridge.on_stop "
      "says whether kernels end or stay for the next start; under systemd their connections go "
      "to its file-descriptor store); SIGUSR2 restarts in place, e.g. after an upgrade, handing "
      "every kernel's connections to the new image with nothing lost; SIGHUP reloads "
      "api.tokens_file (docs/state.md, docs/operations.md).");
  serve->add_option("--config", options->config_file, "the bridge's TOML configuration file")
      ->required();
  serve->add_flag("--start-empty", options->start_empty,
                  "if state_dir/state.db cannot be read (corrupt, not a database, from a newer "
                  "version), keep it under another name and start with no kernels instead of "
                  "refusing to start");
  serve->callback([options] {
    options->command_line_log_level = global_options().log_level;
    int code = run_serve(*options);
    if (code != 0) throw ExitStatus{code};
  });
}

}  // namespace

void add_commands(CLI::App& app) {
  add_serve_command(app);
  add_front_commands(app);
  add_config_commands(app);
}

}  // namespace kb::bridge
