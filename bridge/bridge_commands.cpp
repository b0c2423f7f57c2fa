#include "bridge/commands.hpp"

namespace kb::bridge {

// The bridge service's subcommands (serve, kernel, kernelspec, …) arrive with the bridge-service
// work; until then the tunnel and unicore subcommands are the whole CLI.
void add_front_commands(CLI::App& app);  // cli_commands.cpp: kernel, kernelspec, list, status, stop, doctor

void add_serve_command(CLI::App& app);  // serve.cpp: serve
void add_config_commands(CLI::App& app);  // config_commands.cpp: config check

void add_commands(CLI::App& app) {
  add_serve_command(app);
  add_front_commands(app);
  add_config_commands(app);
}

}  // namespace kb::bridge
