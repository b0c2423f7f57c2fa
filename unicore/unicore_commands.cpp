#include "bridge/commands.hpp"

namespace kb::unicore {

void add_commands(CLI::App& /*app*/) {}

}  // namespace kb::unicore
