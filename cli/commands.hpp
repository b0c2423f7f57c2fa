#pragma once
// Subcommand registration. Each library adds its own subcommands to the one `kernel-bridge`
// executable; main() only parses and dispatches. Called from main() before parsing.
#include <CLI/CLI.hpp>

namespace kb {

// Thrown by a subcommand's callback to end the process with `code` (after it has told the user why
// on stderr). Returning normally from a callback means exit status 0.
struct ExitStatus {
  int code;
};

// Options every subcommand shares (set by main before the subcommand's callback runs).
struct GlobalOptions {
  std::string log_level = "info";
};
const GlobalOptions& global_options();

namespace tunnel {
void add_commands(CLI::App& app);  // agent, tunnel
}
namespace unicore {
void add_commands(CLI::App& app);  // unicore info|jobs|status|ls|cat|abort
}
namespace bridge {
void add_commands(CLI::App& app);  // serve, kernel, kernelspec, list, status, stop, doctor
}

}  // namespace kb
