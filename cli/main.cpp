// kernel-bridge: one executable, many subcommands. Each library registers its own.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>

#include "cli/commands.hpp"
#include "common/logging.hpp"

namespace kb {
namespace {
GlobalOptions g_options;
}
const GlobalOptions& global_options() {
  return g_options;
}
}  // namespace kb

int main(int argc, char** argv) {
  CLI::App app{
      "kernel-bridge runs Jupyter kernels on batch compute nodes: it submits the kernel's job "
      "through UNICORE and carries the kernel's five ZMQ channels over one SSH connection, so "
      "Jupyter clients use ordinary local endpoints.",
      "kernel-bridge"};
  app.set_version_flag("--version", std::string("kernel-bridge ") + KB_VERSION);
  app.add_option("--log-level", kb::g_options.log_level,
                 "trace, debug, info, warn, error or off (logs go to stderr)")
      ->capture_default_str();
  app.require_subcommand(1);
  app.fallthrough();

  kb::tunnel::add_commands(app);
  kb::unicore::add_commands(app);
  kb::bridge::add_commands(app);

  // Logging must be ready before any subcommand callback runs.
  app.parse_complete_callback([&app] {
    try {
      std::string name = "kernel-bridge";
      if (!app.get_subcommands().empty()) name = app.get_subcommands().front()->get_name();
      kb::init_logging(kb::g_options.log_level, name);
    } catch (const std::exception& e) {
      throw CLI::ValidationError("--log-level", e.what());
    }
  });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help/--version exit 0; every usage error exits 2, as documented for each subcommand.
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const kb::ExitStatus& status) {
    return status.code;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kernel-bridge: %s\n", e.what());
    return 1;
  }
  return 0;
}
