#include "link/process_exit.hpp"

#include <csignal>
#include <cstring>

namespace kb::tunnel {

std::string ProcessExit::signal_name(int signal) {
  const char* abbrev = ::sigabbrev_np(signal);
  if (abbrev) return std::string("SIG") + abbrev;
  return "SIG" + std::to_string(signal);
}

std::optional<int> ProcessExit::signal_number(const std::string& name) {
  if (name.size() <= 3 || name.compare(0, 3, "SIG") != 0) return std::nullopt;
  for (int signal = 1; signal < NSIG; ++signal) {
    if (signal_name(signal) == name) return signal;
  }
  return std::nullopt;
}

std::string ProcessExit::describe() const {
  if (code) return "exit code " + std::to_string(*code);
  if (signal) return "killed by " + signal_name(*signal);
  return "exit status unknown";
}

}  // namespace kb::tunnel
