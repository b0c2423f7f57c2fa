#pragma once
// Test helper: runs a program (argv[0] is a path) in a child process whose stdout and stderr go to
// `log_path` (created 0600, truncated). Returns the child's pid, or -1 if fork failed.
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace kb::tunnel::test {

inline pid_t spawn_logged(std::vector<std::string> args, const std::string& log_path) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd >= 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(argv[0], argv.data());
  ::_exit(127);
}

}  // namespace kb::tunnel::test
