#pragma once
// `kernel-bridge serve --config FILE`: the bridge daemon. Loads the configuration (invalid → exit 2
// with "file:line: what is wrong"), starts the kernel lifecycle and the control API on one
// io_context thread, and on SIGTERM/SIGINT shuts down in order: the API stops accepting, every
// kernel is shut down and its job aborted (docs/lifecycle.md, "Bridge shutdown"), then it exits 0.
// Called from main's thread only.
#include <string>

namespace kb::bridge {

struct ServeOptions {
  std::string config_file;
  // --log-level as given on the command line: it wins over the file's log_level unless it is the
  // default, "info".
  std::string command_line_log_level = "info";
};

// Runs the daemon until it is told to stop; returns the process exit status.
int run_serve(const ServeOptions& options);

}  // namespace kb::bridge
