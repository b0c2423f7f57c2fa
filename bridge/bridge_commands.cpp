#include "bridge/commands.hpp"

namespace kb::bridge {

// The bridge service's subcommands (serve, kernel, kernelspec, …) arrive with the bridge-service
// work; until then the tunnel and unicore subcommands are the whole CLI.
void add_commands(CLI::App& /*app*/) {}

}  // namespace kb::bridge
