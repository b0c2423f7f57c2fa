#include "bridge/commands.hpp"

namespace kb::bridge {

// The bridge service's subcommands (serve, kernel, kernelspec, …) arrive with the bridge-service
// work; until then the tunnel and unicore subcommands are the whole CLI.
void add_config_commands(CLI::App& app);  // config_commands.cpp: config check

void add_serve_command(CLI::App& app);  // serve.cpp: serve

void add_commands(CLI::App& app) {
  add_serve_command(app);
  add_config_commands(app);
}

}  // namespace kb::bridge
