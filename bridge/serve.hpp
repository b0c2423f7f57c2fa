#pragma once
// `kernel-bridge serve --config FILE`: the bridge daemon. Loads the configuration (invalid → exit 2
// with "file:line: what is wrong"), starts the kernel lifecycle and the control API on one
// io_context thread, and on SIGTERM/SIGINT shuts down in order: the API stops accepting, every
// kernel is shut down and its job aborted (docs/lifecycle.md, "Bridge shutdown"), then it exits 0.
// Called from main's thread only.
#include <CLI/CLI.hpp>

#include <string>

namespace kb::bridge {

struct ServeOptions {
  std::string config_file;
};

// Runs the daemon until it is told to stop; returns the process exit status.
int run_serve(const ServeOptions& options);

// Registers `serve` on the kernel-bridge command line.
void add_serve_command(CLI::App& app);

}  // namespace kb::bridge
