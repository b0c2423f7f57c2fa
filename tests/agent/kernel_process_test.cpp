// Tests agent/kernel_process.*: /bin/sh scripts stand in for kernels; the tests check what the
// agent relies on — exit code or signal reported, SIGINT reaches the kernel, terminate kills the
// kernel's children too, a restart gets a new pid.
#include "agent/kernel_process.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

namespace kb::tunnel {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class KernelProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "kb-kp-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs the loop until `done` holds (or a generous safety limit, which fails the caller's
  // assertion rather than hanging the suite).
  bool run_until(const std::function<bool()>& done, std::chrono::seconds limit = 30s) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      io_.restart();
      io_.run_for(20ms);
    }
    return done();
  }

  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  static std::string read(const std::string& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  static bool process_gone(pid_t pid) {
    if (::kill(pid, 0) != 0) return true;
    // A zombie waiting for init to reap it is dead for our purposes.
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(stat, line);
    auto close = line.rfind(')');
    return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
  }

  boost::asio::io_context io_;
  std::string dir_;
};

TEST_F(KernelProcessTest, ReportsExitCode) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  ASSERT_TRUE(kernel.start(
      {"/bin/sh", "-c", "exit 7"}, [&](const ProcessExit& e) { exit = e; }, error))
      << error;
  EXPECT_GT(kernel.pid(), 0);
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  EXPECT_EQ(exit->code, 7);
  EXPECT_FALSE(exit->signal.has_value());
  EXPECT_EQ(exit->describe(), "exit code 7");
  EXPECT_FALSE(kernel.running());
}

TEST_F(KernelProcessTest, ReportsTheKillingSignal) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  ASSERT_TRUE(kernel.start(
      {"sh", "-c", "kill -KILL $$"}, [&](const ProcessExit& e) { exit = e; }, error))
      << error;
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  EXPECT_EQ(exit->signal, SIGKILL);
  EXPECT_EQ(exit->describe(), "killed by SIGKILL");
}

// The agent reports a kernel's signal by name and the bridge needs the number back: every signal
// survives the round trip, and what is not a signal name is refused.
TEST(ProcessExitTest, SignalNamesRoundTrip) {
  EXPECT_EQ(ProcessExit::signal_name(SIGTERM), "SIGTERM");
  EXPECT_EQ(ProcessExit::signal_number("SIGTERM"), SIGTERM);
  EXPECT_EQ(ProcessExit::signal_number("SIGKILL"), SIGKILL);
  for (int signal = 1; signal < NSIG; ++signal) {
    EXPECT_EQ(ProcessExit::signal_number(ProcessExit::signal_name(signal)), signal)
        << ProcessExit::signal_name(signal);
  }
  EXPECT_EQ(ProcessExit::signal_number("SIGNOPE"), std::nullopt);
  EXPECT_EQ(ProcessExit::signal_number("TERM"), std::nullopt);
  EXPECT_EQ(ProcessExit::signal_number("SIG"), std::nullopt);
  EXPECT_EQ(ProcessExit::signal_number(""), std::nullopt);
  EXPECT_EQ(ProcessExit::signal_number("SIG" + std::to_string(NSIG)), std::nullopt);
}

TEST_F(KernelProcessTest, SubstitutedArgvAndPathSearch) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  std::string out = path("args");
  ASSERT_TRUE(kernel.start(
      {"sh", "-c", "echo \"$1 $2\" > " + out, "sh", "one", "two words"},
      [&](const ProcessExit& e) { exit = e; }, error))
      << error;
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  EXPECT_EQ(exit->code, 0);
  EXPECT_EQ(read(out), "one two words\n");
}

TEST_F(KernelProcessTest, MissingProgramIsAnErrorNamingIt) {
  KernelProcess kernel(io_, "t");
  std::string error;
  EXPECT_FALSE(kernel.start({"no-such-kernel-program-xyz"}, nullptr, error));
  EXPECT_NE(error.find("no-such-kernel-program-xyz"), std::string::npos) << error;
  std::string script = path("not-executable.sh");
  std::ofstream(script) << "#!/bin/sh\n";
  EXPECT_FALSE(kernel.start({script}, nullptr, error));
  EXPECT_NE(error.find(script), std::string::npos) << error;
  EXPECT_FALSE(kernel.running());
}

TEST_F(KernelProcessTest, KernelGetsNoInheritedDescriptorsAndOwnGroup) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  std::string out = path("fds");
  // An fd of ours without CLOEXEC must not leak into the kernel.
  int leaked = ::dup(1);
  ASSERT_GE(leaked, 3);
  std::string pgid_file = path("pgid");
  // `exec ls` lists its own descriptors: 0-2 plus the directory it reads (3); anything else leaked.
  ASSERT_TRUE(kernel.start(
      {"sh", "-c", "ps -o pgid= -p $$ > " + pgid_file + "; exec ls /proc/self/fd > " + out},
      [&](const ProcessExit& e) { exit = e; }, error))
      << error;
  pid_t pid = kernel.pid();
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  ::close(leaked);
  std::string text = read(out);
  std::istringstream fds(text);
  int fd;
  while (fds >> fd) {
    EXPECT_LE(fd, 3) << "fd " << fd << " leaked into the kernel: " << text;
  }
  std::string pgid = read(pgid_file);
  ASSERT_FALSE(pgid.empty());
  EXPECT_EQ(std::stoi(pgid), pid) << "kernel not in its own process group: " << text;
}

TEST_F(KernelProcessTest, InterruptDeliversSigintToTheKernel) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  std::string ready = path("ready"), got = path("got-int");
  std::string script = "trap 'echo int > " + got + "; exit 42' INT; touch " + ready +
                       "; while true; do sleep 0.05; done";
  ASSERT_TRUE(kernel.start(
      {"sh", "-c", script}, [&](const ProcessExit& e) { exit = e; }, error))
      << error;
  ASSERT_TRUE(run_until([&] { return fs::exists(ready); }));
  EXPECT_TRUE(kernel.interrupt());
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  EXPECT_EQ(exit->code, 42);
  EXPECT_EQ(read(got), "int\n");
  EXPECT_FALSE(kernel.interrupt());  // nothing running any more
}

TEST_F(KernelProcessTest, TerminateEndsAKernelThatHonoursSigterm) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  std::string ready = path("ready");
  ASSERT_TRUE(kernel.start(
      {"sh", "-c", "touch " + ready + "; exec sleep 1000"}, [&](const ProcessExit& e) { exit = e; },
      error))
      << error;
  ASSERT_TRUE(run_until([&] { return fs::exists(ready); }));
  kernel.terminate(10s);
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  EXPECT_EQ(exit->signal, SIGTERM);
}

TEST_F(KernelProcessTest, TerminateKillsStubbornKernelAndItsChildren) {
  KernelProcess kernel(io_, "t");
  std::optional<ProcessExit> exit;
  std::string error;
  std::string child_pid = path("child"), ready = path("ready");
  // The "kernel" ignores SIGTERM and has a child that ignores it too.
  std::string script =
      "trap '' TERM; sh -c 'trap \"\" TERM; while true; do sleep 0.05; done' & echo $! > " +
      child_pid + "; touch " + ready + "; while true; do sleep 0.05; done";
  ASSERT_TRUE(kernel.start(
      {"sh", "-c", script}, [&](const ProcessExit& e) { exit = e; }, error))
      << error;
  ASSERT_TRUE(run_until([&] { return fs::exists(ready); }));
  pid_t child = std::stoi(read(child_pid));
  ASSERT_FALSE(process_gone(child));
  kernel.terminate(300ms);
  ASSERT_TRUE(run_until([&] { return exit.has_value(); }));
  EXPECT_EQ(exit->signal, SIGKILL);
  EXPECT_TRUE(run_until([&] { return process_gone(child); }))
      << "the kernel's child " << child << " survived terminate()";
}

TEST_F(KernelProcessTest, RestartGivesANewPidAndRefusesWhileRunning) {
  KernelProcess kernel(io_, "t");
  int exits = 0;
  std::string error;
  ASSERT_TRUE(kernel.start(
      {"sleep", "1000"}, [&](const ProcessExit&) { ++exits; }, error));
  pid_t first = kernel.pid();
  EXPECT_FALSE(kernel.start({"sleep", "1000"}, nullptr, error));
  EXPECT_NE(error.find("still running"), std::string::npos);
  kernel.terminate(5s);
  ASSERT_TRUE(run_until([&] { return exits == 1; }));
  ASSERT_TRUE(kernel.start(
      {"sleep", "1000"}, [&](const ProcessExit&) { ++exits; }, error));
  EXPECT_NE(kernel.pid(), first);
  EXPECT_TRUE(kernel.running());
  kernel.terminate(5s);
  ASSERT_TRUE(run_until([&] { return exits == 2; }));
}

TEST_F(KernelProcessTest, DestructorLeavesNoOrphan) {
  pid_t pid;
  {
    KernelProcess kernel(io_, "t");
    std::string error;
    ASSERT_TRUE(kernel.start({"sleep", "1000"}, nullptr, error));
    pid = kernel.pid();
  }
  EXPECT_TRUE(run_until([&] {
    int status;
    ::waitpid(pid, &status, WNOHANG);
    return process_gone(pid);
  }));
}

}  // namespace
}  // namespace kb::tunnel
