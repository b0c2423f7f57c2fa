#pragma once
// KernelProcess: one kernel (any argv) started in its own process group, watched without blocking
// the event loop (a pidfd on Linux >= 5.3, else SIGCHLD + waitpid(WNOHANG)), interrupted with
// SIGINT, terminated with SIGTERM to the whole group and SIGKILL after a grace period.
// Thread model: create, call and destroy it only on the thread that runs its io_context; the exit
// handler runs there too.
#include <sys/types.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "link/process_exit.hpp"

namespace kb::tunnel {

class KernelProcess {
 public:
  using ExitHandler = std::function<void(const ProcessExit&)>;

  KernelProcess(boost::asio::io_context& io, std::string log_id);
  // Kills the whole group with SIGKILL if it is still running (never leaves an orphan kernel).
  ~KernelProcess();
  KernelProcess(const KernelProcess&) = delete;
  KernelProcess& operator=(const KernelProcess&) = delete;

  // Starts argv[0] (searched in PATH when it has no '/') with stdin from /dev/null, the agent's
  // stdout/stderr, no other inherited descriptors, default signal dispositions, in a new process
  // group, and SIGKILL if the agent itself dies (PR_SET_PDEATHSIG). `on_exit` runs once when the
  // process ends. Returns false with `error` set (naming the program) if it could not be started;
  // refuses while a previous process is still running.
  bool start(const std::vector<std::string>& argv, ExitHandler on_exit, std::string& error);

  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // SIGINT to the kernel process only (ipykernel turns it into KeyboardInterrupt); its children
  // are not disturbed. Returns false if nothing is running.
  bool interrupt();
  // SIGTERM to the process group, SIGKILL to the group after `grace` if the kernel has not exited.
  // The exit handler given to start() runs when it has; the group's leftovers (children the kernel
  // started that ignore SIGTERM) get SIGKILL then. No-op if nothing is running.
  void terminate(std::chrono::milliseconds grace);

 private:
  void watch_exit();
  void on_maybe_exited();
  void reap(int status);

  boost::asio::io_context& io_;
  std::string log_id_;
  pid_t pid_ = -1;
  std::chrono::steady_clock::time_point started_at_;
  ExitHandler on_exit_;
  // Exit watch: a pidfd when the kernel supports it, else the SIGCHLD fallback.
  std::optional<boost::asio::posix::stream_descriptor> pidfd_;
  std::optional<boost::asio::signal_set> sigchld_;
  boost::asio::steady_timer kill_timer_;
  // Guards handlers that may run after this object is gone.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kb::tunnel
