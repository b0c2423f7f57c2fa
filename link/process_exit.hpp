#pragma once
// ProcessExit: how a kernel process ended (exit code or signal), as the agent observes it and the
// link reports it to the hub side (the agent's kernel_exited message). A plain value.
#include <optional>
#include <string>

namespace kb::tunnel {

// How a process ended: exactly one of `code` (it called exit) or `signal` (it was killed) is set.
struct ProcessExit {
  std::optional<int> code;
  std::optional<int> signal;
  // "exit code 1", "killed by SIGKILL"
  std::string describe() const;
  // "SIGKILL" etc. for a signal number; "SIG<n>" for unknown ones.
  static std::string signal_name(int signal);
  // The inverse of signal_name ("SIGKILL" -> 9, "SIG40" -> 40); nullopt for anything else. For the
  // one place a signal arrives as a name: the agent's kernel_exited message.
  static std::optional<int> signal_number(const std::string& name);
};

}  // namespace kb::tunnel
