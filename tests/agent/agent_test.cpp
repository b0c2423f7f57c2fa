// Tests agent/agent.* through the real `kernel-bridge agent` ($KB_BINARY) as a subprocess: the
// discovery file, exiting when no bridge comes, SIGTERM, bad usage, and that a stranger knocking
// with garbage neither crashes the agent nor starts a kernel. (With a bridge and a kernel:
// hub_kernel_test.cpp.)
#include "agent/agent.hpp"

#include "tests/agent/spawn.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

namespace kb::tunnel {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string binary() {
  const char* b = std::getenv("KB_BINARY");
  return b ? b : "";
}

class AgentProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (binary().empty() || !fs::exists(binary())) GTEST_SKIP() << "KB_BINARY not set";
    std::string tmpl = (fs::temp_directory_path() / "kb-agent-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    kb::auth::LinkSecret::generate().write_file(dir_ + "/link.secret");
  }
  void TearDown() override {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    fs::remove_all(dir_);
  }

  std::vector<std::string> base_args() {
    return {binary(),           "agent",
            "--listen",         "127.0.0.1:0",
            "--secret-file",    dir_ + "/link.secret",
            "--discovery-file", dir_ + "/agent.json",
            "--runtime-dir",    dir_ + "/runtime"};
  }

  void spawn(std::vector<std::string> args, bool with_kernel = true) {
    if (with_kernel) {
      args.push_back("--");
      args.push_back("/bin/sh");
      args.push_back("-c");
      args.push_back("touch " + dir_ + "/kernel-ran; sleep 1000");
      args.push_back("{connection_file}");
    }
    pid_ = test::spawn_logged(std::move(args), dir_ + "/agent.log");
    ASSERT_GE(pid_, 0);
  }

  // Waits for the agent to exit (a generous safety bound); returns its wait status or -1.
  int wait_exit(std::chrono::seconds limit = 60s) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      std::this_thread::sleep_for(20ms);
    }
    return -1;
  }

  bool wait_discovery() {
    auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!fs::exists(dir_ + "/agent.json")) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(20ms);
    }
    return true;
  }

  std::string log() {
    std::ifstream in(dir_ + "/agent.log");
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  std::string dir_;
  pid_t pid_ = -1;
};

TEST_F(AgentProcessTest, WritesDiscoveryFileAndListens) {
  spawn(base_args());
  ASSERT_TRUE(wait_discovery()) << log();
  std::ifstream in(dir_ + "/agent.json");
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["host"], "127.0.0.1");
  EXPECT_EQ(j["pid"], pid_);
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  EXPECT_EQ(j["hostname"], host);
  EXPECT_EQ(j["version"], KB_VERSION);
  ASSERT_TRUE(j["port"].is_number_integer());
  EXPECT_GT(j["port"].get<int>(), 0);
  EXPECT_FALSE(j.contains("secret"));
  struct stat st {};
  ASSERT_EQ(::stat((dir_ + "/agent.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  // Something really listens there.
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket s(io);
  boost::system::error_code ec;
  s.connect({boost::asio::ip::make_address("127.0.0.1"), j["port"].get<std::uint16_t>()}, ec);
  EXPECT_FALSE(ec) << ec.message();
  // The private runtime directory exists (0700) but holds no connection file before a bridge asks.
  std::size_t dirs = 0;
  for (const auto& e : fs::directory_iterator(dir_ + "/runtime")) {
    ++dirs;
    ASSERT_EQ(::stat(e.path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    EXPECT_TRUE(fs::is_empty(e.path()));
  }
  EXPECT_EQ(dirs, 1u);
}

TEST_F(AgentProcessTest, ExitsWithStatus3WhenNoBridgeComes) {
  auto args = base_args();
  args.push_back("--no-bridge-timeout");
  args.push_back("0.5");
  spawn(args);
  int status = wait_exit();
  ASSERT_NE(status, -1) << "the agent did not give up without a bridge\n" << log();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kAgentExitNoBridge) << log();
  EXPECT_NE(log().find("no authenticated bridge"), std::string::npos) << log();
  EXPECT_FALSE(fs::exists(dir_ + "/kernel-ran")) << "a kernel was started without a bridge";
  EXPECT_TRUE(fs::is_empty(dir_ + "/runtime")) << "runtime directory left behind";
}

TEST_F(AgentProcessTest, SigtermEndsTheAgentWith143) {
  spawn(base_args());
  ASSERT_TRUE(wait_discovery()) << log();
  ::kill(pid_, SIGTERM);
  int status = wait_exit();
  ASSERT_NE(status, -1) << log();
  ASSERT_TRUE(WIFEXITED(status)) << log();
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGTERM) << log();
  EXPECT_NE(log().find("SIGTERM received (allocation ending)"), std::string::npos) << log();
  EXPECT_TRUE(fs::is_empty(dir_ + "/runtime")) << "runtime directory left behind";
}

TEST_F(AgentProcessTest, GarbageFromAStrangerStartsNothing) {
  spawn(base_args());
  ASSERT_TRUE(wait_discovery()) << log();
  std::ifstream in(dir_ + "/agent.json");
  auto port = nlohmann::json::parse(in)["port"].get<std::uint16_t>();
  boost::asio::io_context io;
  for (int i = 0; i < 3; ++i) {
    boost::asio::ip::tcp::socket s(io);
    s.connect({boost::asio::ip::make_address("127.0.0.1"), port});
    std::string junk(4096, '\xff');
    boost::system::error_code ec;
    boost::asio::write(s, boost::asio::buffer(junk), ec);
    // The agent closes the connection (refused knock) rather than waiting for more.
    char buf[256];
    while (!ec) s.read_some(boost::asio::buffer(buf), ec);
  }
  EXPECT_EQ(::waitpid(pid_, nullptr, WNOHANG), 0) << "the agent died from garbage:\n" << log();
  EXPECT_FALSE(fs::exists(dir_ + "/kernel-ran"));
  EXPECT_EQ(log().find("bridge authenticated"), std::string::npos) << log();
}

TEST_F(AgentProcessTest, BadUsageExitsWith2AndSaysWhy) {
  // A secret file others can read is refused, naming the file.
  fs::permissions(dir_ + "/link.secret", fs::perms::group_read | fs::perms::others_read,
                  fs::perm_options::add);
  spawn(base_args());
  int status = wait_exit();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kAgentExitUsage) << log();
  EXPECT_NE(log().find(dir_ + "/link.secret"), std::string::npos) << log();

  // No kernel command.
  fs::permissions(dir_ + "/link.secret", fs::perms::owner_read | fs::perms::owner_write,
                  fs::perm_options::replace);
  spawn(base_args(), /*with_kernel=*/false);
  status = wait_exit();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kAgentExitUsage) << log();
  EXPECT_NE(log().find("no kernel command"), std::string::npos) << log();

  // An address that is not this node's.
  auto args = base_args();
  args[3] = "192.0.2.1:0";  // TEST-NET-1: never local; bind fails, nothing is sent
  spawn(args);
  status = wait_exit();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kAgentExitUsage) << log();
  EXPECT_NE(log().find("cannot listen on 192.0.2.1"), std::string::npos) << log();
}

TEST(ParseListenAddress, AcceptsTheContractForms) {
  std::string host;
  std::uint16_t port = 99;
  parse_listen_address("10.0.0.3", host, port);
  EXPECT_EQ(host, "10.0.0.3");
  EXPECT_EQ(port, 0);
  parse_listen_address("10.0.0.3:4567", host, port);
  EXPECT_EQ(port, 4567);
  parse_listen_address("[fd00::3]:80", host, port);
  EXPECT_EQ(host, "fd00::3");
  EXPECT_EQ(port, 80);
  parse_listen_address("fd00::3", host, port);
  EXPECT_EQ(host, "fd00::3");
  EXPECT_EQ(port, 0);
  EXPECT_THROW(parse_listen_address("10.0.0.3:99999", host, port), AgentError);
  EXPECT_THROW(parse_listen_address(":80", host, port), AgentError);
  EXPECT_THROW(parse_listen_address("[fd00::3", host, port), AgentError);
}

}  // namespace
}  // namespace kb::tunnel
