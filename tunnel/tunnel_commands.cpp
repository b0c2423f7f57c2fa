#include "bridge/commands.hpp"

namespace kb::tunnel {

void add_commands(CLI::App& /*app*/) {}

}  // namespace kb::tunnel
