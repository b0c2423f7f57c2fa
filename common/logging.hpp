#pragma once
// Process-wide logging set-up shared by every subcommand. Call once from main, before threads
// start.
#include <string>

namespace kb {

// level: trace|debug|info|warn|error|off. Logs go to stderr, one line per event, with a UTC
// timestamp. Throws std::invalid_argument naming the bad level.
void init_logging(const std::string& level, const std::string& process_name);

}  // namespace kb
