#pragma once
// `kernel-bridge serve --config FILE`: the bridge daemon. Loads the configuration (invalid → exit 2
// with "file:line: what is wrong"), opens the state database (state_dir/state.db; unreadable → exit
// 2 naming the file, unless --start-empty) and re-attaches every kernel recorded there, starts the
// kernel lifecycle and the control API on one io_context thread. On SIGTERM/SIGINT the API stops
// accepting; then, as bridge.on_stop says, every kernel is shut down and its job aborted
// (docs/lifecycle.md, "Bridge shutdown"), or every kernel is left running for the next start
// (docs/state.md); then it exits 0. Called from main's thread only.
#include <string>

namespace kb::bridge {

struct ServeOptions {
  std::string config_file;
  // --log-level as given on the command line: it wins over the file's log_level unless it is the
  // default, "info".
  std::string command_line_log_level = "info";
  // --start-empty: an unreadable state database is moved aside instead of refusing to start.
  bool start_empty = false;
};

// Runs the daemon until it is told to stop; returns the process exit status.
int run_serve(const ServeOptions& options);

}  // namespace kb::bridge
