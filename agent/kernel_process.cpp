#include "agent/kernel_process.hpp"

#include <fcntl.h>
#include <linux/close_range.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <boost/asio/post.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace kb::tunnel {

namespace {

// The program to exec: argv[0] itself when it names a path, else the first executable regular
// file of that name in PATH (resolved before fork, so the child only calls execv).
std::string resolve_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* env = std::getenv("PATH");
  std::string path = env && *env ? env : "/usr/local/bin:/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + name;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
    start = end + 1;
  }
  return {};
}

int pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

// Runs in the forked child before exec: only async-signal-safe calls.
[[noreturn]] void exec_child(const char* program, char* const* argv, int devnull, int error_fd,
                             pid_t parent) {
  ::setpgid(0, 0);
  // The kernel must not outlive an agent killed with SIGKILL (an orphan would burn compute hours).
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(127);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (devnull >= 0) ::dup2(devnull, 0);
  // Nothing of the agent's (link sockets, listeners) may leak into the kernel.
  if (::syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
    for (int fd = 3; fd < 65536; ++fd) {
      if (fd != error_fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
  }
  ::execv(program, argv);
  int err = errno;
  ssize_t ignored = ::write(error_fd, &err, sizeof err);
  (void)ignored;
  ::_exit(127);
}

}  // namespace

KernelProcess::KernelProcess(boost::asio::io_context& io, std::string log_id)
    : io_(io), log_id_(std::move(log_id)), kill_timer_(io) {}

KernelProcess::~KernelProcess() {
  *alive_ = false;
  if (pid_ > 0) {
    spdlog::warn("[{}] kernel pid {} still running at shutdown: killing its process group", log_id_,
                 pid_);
    ::kill(-pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, WNOHANG);
  }
}

bool KernelProcess::start(const std::vector<std::string>& argv, ExitHandler on_exit,
                          std::string& error) {
  if (pid_ > 0) {
    error = "a kernel (pid " + std::to_string(pid_) + ") is still running";
    return false;
  }
  if (argv.empty()) {
    error = "no kernel command given";
    return false;
  }
  std::string program = resolve_program(argv[0]);
  if (program.empty()) {
    error = "kernel program '" + argv[0] + "' not found in PATH";
    return false;
  }
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);

  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) {
    error = std::string("cannot start the kernel: pipe: ") + std::strerror(errno);
    return false;
  }
  int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    if (devnull >= 0) ::close(devnull);
    error = std::string("cannot start the kernel: fork: ") + std::strerror(err);
    return false;
  }
  if (pid == 0) exec_child(program.c_str(), cargv.data(), devnull, pipefd[1], parent);

  ::setpgid(pid, pid);  // also in the parent, so a signal to the group cannot race the child
  ::close(pipefd[1]);
  if (devnull >= 0) ::close(devnull);
  // Returns as soon as the child has exec'd (the pipe closes on exec) or failed to: the same short
  // wait posix_spawn makes.
  int child_errno = 0;
  ssize_t n;
  do {
    n = ::read(pipefd[0], &child_errno, sizeof child_errno);
  } while (n < 0 && errno == EINTR);
  ::close(pipefd[0]);
  if (n == static_cast<ssize_t>(sizeof child_errno)) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    error = "cannot execute kernel program " + program + ": " + std::strerror(child_errno);
    return false;
  }

  pid_ = pid;
  started_at_ = std::chrono::steady_clock::now();
  on_exit_ = std::move(on_exit);
  spdlog::info("[{}] kernel process started: pid {} ({})", log_id_, pid_, program);
  watch_exit();
  return true;
}

void KernelProcess::watch_exit() {
  std::weak_ptr<bool> alive = alive_;
  int fd = pidfd_open(pid_);
  if (fd >= 0) {
    pidfd_.emplace(io_, fd);
    pidfd_->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                       [this, alive](const boost::system::error_code& ec) {
                         if (alive.expired() || ec == boost::asio::error::operation_aborted) return;
                         on_maybe_exited();
                       });
    return;
  }
  // Kernels older than 5.3: SIGCHLD tells us some child changed state; waitpid on our pid says
  // whether it was ours. Checked once right away, since the child may have exited before the
  // handler was installed.
  if (!sigchld_) sigchld_.emplace(io_, SIGCHLD);
  sigchld_->async_wait([this, alive](const boost::system::error_code& ec, int) {
    if (alive.expired() || ec == boost::asio::error::operation_aborted) return;
    on_maybe_exited();
  });
  boost::asio::post(io_, [this, alive] {
    if (alive.expired() || pid_ <= 0) return;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) reap(status);
  });
}

void KernelProcess::on_maybe_exited() {
  if (pid_ <= 0) return;
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid_, &status, WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r == pid_) {
    reap(status);
    return;
  }
  if (r < 0) {
    spdlog::error("[{}] cannot wait for kernel pid {}: {}", log_id_, pid_, std::strerror(errno));
    reap(-1);
    return;
  }
  // Not (yet) ours: wait again.
  std::weak_ptr<bool> alive = alive_;
  if (pidfd_) {
    pidfd_->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                       [this, alive](const boost::system::error_code& ec) {
                         if (alive.expired() || ec == boost::asio::error::operation_aborted) return;
                         on_maybe_exited();
                       });
  } else if (sigchld_) {
    sigchld_->async_wait([this, alive](const boost::system::error_code& ec, int) {
      if (alive.expired() || ec == boost::asio::error::operation_aborted) return;
      on_maybe_exited();
    });
  }
}

void KernelProcess::reap(int status) {
  pid_t pid = pid_;
  pid_ = -1;
  kill_timer_.cancel();
  if (pidfd_) {
    boost::system::error_code ignored;
    pidfd_->close(ignored);
    pidfd_.reset();
  }
  if (sigchld_) {
    boost::system::error_code ignored;
    sigchld_->cancel(ignored);
  }
  // Children the kernel started (still in its group) must not outlive it: they could hold its
  // ports or keep burning the allocation.
  ::kill(-pid, SIGKILL);

  ProcessExit exit;
  if (status >= 0 && WIFEXITED(status)) exit.code = WEXITSTATUS(status);
  if (status >= 0 && WIFSIGNALED(status)) exit.signal = WTERMSIG(status);
  auto lived = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - started_at_);
  spdlog::info("[{}] kernel pid {} ended: {} (after {} ms)", log_id_, pid, exit.describe(),
               lived.count());
  auto handler = std::move(on_exit_);
  on_exit_ = nullptr;
  if (handler) handler(exit);
}

bool KernelProcess::interrupt() {
  if (pid_ <= 0) return false;
  if (::kill(pid_, SIGINT) != 0) {
    spdlog::warn("[{}] cannot send SIGINT to kernel pid {}: {}", log_id_, pid_,
                 std::strerror(errno));
    return false;
  }
  spdlog::info("[{}] SIGINT sent to kernel pid {}", log_id_, pid_);
  return true;
}

void KernelProcess::terminate(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return;
  if (::kill(-pid_, SIGTERM) != 0) ::kill(pid_, SIGTERM);
  spdlog::info("[{}] SIGTERM sent to kernel process group {} (SIGKILL in {} ms)", log_id_, pid_,
               grace.count());
  pid_t pid = pid_;
  std::weak_ptr<bool> alive = alive_;
  kill_timer_.expires_after(grace);
  kill_timer_.async_wait([this, alive, pid](const boost::system::error_code& ec) {
    if (ec || alive.expired() || pid_ != pid) return;
    spdlog::warn("[{}] kernel pid {} did not exit within the grace period: SIGKILL to its group",
                 log_id_, pid);
    ::kill(-pid, SIGKILL);
  });
}

}  // namespace kb::tunnel
