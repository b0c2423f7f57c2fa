#pragma once
// `kernel-bridge doctor`: checks a deployment the way the daemon will use it — configuration,
// UNICORE reachability and the user's token, the login hosts' SSH host keys and the service key's
// login, the agent on the site — and prints one PASS/FAIL/SKIP line per check with what to do.
// Runs in the CLI's main thread; blocking (it owns a private io_context for the SSH check).
#include <iosfwd>
#include <string>

namespace kb::bridge {

struct DoctorOptions {
  std::string config_file;
  std::string site;        // empty: every configured site
  std::string token_file;  // a UNICORE access token (first line); or KERNEL_BRIDGE_UNICORE_TOKEN
  std::string socket;      // the daemon's socket to probe; empty: the config's [api] unix_socket
  int timeout_seconds = 20;
};

// Prints the checks to `out`; returns the number of failed checks.
int run_doctor(const DoctorOptions& options, std::ostream& out);

}  // namespace kb::bridge
