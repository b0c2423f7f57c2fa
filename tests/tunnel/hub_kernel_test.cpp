// Tests tunnel/hub_kernel.* end to end over direct TCP on 127.0.0.1: a HubKernel in this process
// (given its ConnectionInfo and reporting typed events, as the daemon drives it), the real
// `kernel-bridge agent` ($KB_BINARY) as a subprocess, and a fake "kernel" (a small Python script
// that listens on the five ports of the connection file the agent wrote, greets each connection
// with "<channel> <pid>\n" and echoes bytes). Shows what a Jupyter user relies on:
// start_kernel starts the kernel with the right key in a 0600 connection file on 127.0.0.1 only,
// bytes flow both ways per channel, interrupt delivers SIGINT, restart gives a new kernel process
// (old connections closed, new ones reach it), shutdown ends the agent; SIGTERM to the agent is
// reported and stops the kernel.
#include "tunnel/hub_kernel.hpp"

#include "common/overloaded.hpp"
#include "tests/agent/spawn.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <boost/asio/execution.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>

namespace kb::tunnel {
namespace {

namespace fs = std::filesystem;
namespace asio = boost::asio;
using namespace std::chrono_literals;

const char* kFakeKernel = R"PY(
import json, os, signal, socket, sys, threading
cf = json.load(open(sys.argv[1]))
state = sys.argv[2]
def on_int(*_):
    open(os.path.join(state, "sigint-%d" % os.getpid()), "w").close()
signal.signal(signal.SIGINT, on_int)
def echo(name, conn):
    conn.sendall(("%s %d\n" % (name, os.getpid())).encode())
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.close()
def serve(name, sock):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=echo, args=(name, conn), daemon=True).start()
socks = []
for name in ("shell", "iopub", "stdin", "control", "hb"):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ does
    s.bind((cf["ip"], cf[name + "_port"]))
    s.listen(16)
    socks.append((name, s))
for name, s in socks:
    threading.Thread(target=serve, args=(name, s), daemon=True).start()
with open(os.path.join(state, "kernel-%d.json" % os.getpid()), "w") as f:
    json.dump({"key": cf["key"], "connection_file": sys.argv[1]}, f)
while True:
    signal.pause()
)PY";

std::string python() {
  const char* p = std::getenv("KB_PYTHON");
  return p && *p ? p : "/usr/bin/python3";
}

std::string binary() {
  const char* b = std::getenv("KB_BINARY");
  return b ? b : "";
}

// Local listening sockets on `port` from /proc/net/tcp and tcp6, as "hexaddr" strings.
std::vector<std::string> listeners_on(std::uint16_t port) {
  std::vector<std::string> found;
  char want[8];
  std::snprintf(want, sizeof want, "%04X", port);
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, st;
      fields >> slot >> local >> remote >> st;
      auto colon = local.rfind(':');
      if (st == "0A" && local.substr(colon + 1) == want) found.push_back(local.substr(0, colon));
    }
  }
  return found;
}

class HubKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (binary().empty() || !fs::exists(binary())) GTEST_SKIP() << "KB_BINARY not set";
    std::string tmpl = (fs::temp_directory_path() / "kb-hub-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    state_ = dir_ + "/state";
    fs::create_directories(state_);
    std::ofstream(dir_ + "/fake_kernel.py") << kFakeKernel;
    secret_ = kb::auth::LinkSecret::generate();
    secret_.write_file(dir_ + "/link.secret");
    key_ = kb::auth::to_hex(kb::auth::random_bytes(16));
    start_agent();
  }

  void TearDown() override {
    if (kernel_) {
      asio::post(io_, [this] {
        kernel_->close("test over");
        kernel_.reset();
      });
    }
    work_.reset();
    if (io_thread_.joinable()) io_thread_.join();
    if (agent_pid_ > 0) {
      ::kill(agent_pid_, SIGKILL);
      ::waitpid(agent_pid_, nullptr, 0);
    }
    // Fake kernels the agent started (its PDEATHSIG kills them too; this is belt and braces).
    for (const auto& e : fs::directory_iterator(state_)) {
      auto name = e.path().filename().string();
      if (name.rfind("kernel-", 0) == 0) {
        ::kill(std::stoi(name.substr(7)), SIGKILL);
      }
    }
    fs::remove_all(dir_);
  }

  void start_agent() {
    std::vector<std::string> args = {binary(),
                                     "agent",
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--secret-file",
                                     dir_ + "/link.secret",
                                     "--discovery-file",
                                     dir_ + "/agent.json",
                                     "--runtime-dir",
                                     dir_ + "/runtime",
                                     "--kernel-grace",
                                     "2",
                                     "--no-bridge-timeout",
                                     "120",
                                     "--",
                                     python(),
                                     dir_ + "/fake_kernel.py",
                                     "{connection_file}",
                                     state_};
    agent_pid_ = test::spawn_logged(std::move(args), dir_ + "/agent.log");
    ASSERT_GE(agent_pid_, 0);
    ASSERT_TRUE(wait_for([&] { return fs::exists(dir_ + "/agent.json"); }, 30s)) << agent_log();
    std::ifstream in(dir_ + "/agent.json");
    discovery_ = nlohmann::json::parse(in);
  }

  std::string agent_log() {
    std::ifstream in(dir_ + "/agent.log");
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  // Polls `pred` (on the test thread) until true or `limit`: a safety bound, not a timing claim.
  static bool wait_for(const std::function<bool()>& pred, std::chrono::seconds limit = 60s) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(20ms);
    }
    return true;
  }

  void start_hub() {
    HubKernel::Options o;
    o.index = 0;
    o.connection.key = key_;  // ports 0: chosen by listen()
    o.connection.kernel_name = "fake";
    o.agent = "127.0.0.1:" + std::to_string(discovery_["port"].get<int>());
    o.secret = secret_;
    auto provider = make_direct_provider(io_, "127.0.0.1", discovery_["port"].get<std::uint16_t>());
    kernel_ = HubKernel::create(io_, o, provider, [this](const HubEvent& e) {
      std::lock_guard lock(mu_);
      events_.push_back(e);
      cv_.notify_all();
    });
    // Before the loop runs: start-up errors surface here as exceptions.
    hub_ = kernel_->listen();
    kernel_->start();
    io_thread_ = std::thread([this] { io_.run(); });
  }

  // Waits for the `count`-th event of type E; returns it (nullopt on timeout).
  template <class E>
  std::optional<E> wait_event(std::size_t count = 1, std::chrono::seconds limit = 60s) {
    std::unique_lock lock(mu_);
    std::optional<E> found;
    cv_.wait_for(lock, limit, [&] {
      std::size_t n = 0;
      for (auto& e : events_) {
        if (auto* hit = std::get_if<E>(&e); hit && ++n == count) {
          found = *hit;
          return true;
        }
      }
      return false;
    });
    return found;
  }

  // The events so far, one per line, for failure messages.
  std::string events_text() {
    std::lock_guard lock(mu_);
    std::string s;
    for (auto& e : events_) {
      s += std::visit(kb::Overloaded{
                          [](const hub_event::Listening&) { return std::string("listening"); },
                          [](const hub_event::LinkUp&) { return std::string("link_up"); },
                          [](const hub_event::LinkDown& d) { return "link_down: " + d.reason; },
                          [](const hub_event::KernelStarted& k) {
                            return "kernel_started: pid " + std::to_string(k.pid) +
                                   (k.restart ? " (restart)" : "");
                          },
                          [](const hub_event::KernelExited& x) {
                            return "kernel_exited: code " +
                                   (x.code ? std::to_string(*x.code) : "-") + " signal " +
                                   (x.signal ? std::to_string(*x.signal) : "-");
                          },
                          [](const hub_event::AgentTerminating& t) {
                            return "agent_terminating: " + t.reason;
                          },
                          [](const hub_event::Error& r) { return "error: " + r.message; },
                          [](const hub_event::Closed& c) { return "closed: " + c.reason; },
                      },
                      e) +
           "\n";
    }
    return s;
  }

  std::uint16_t hub_port(const char* channel) { return hub_.port(kind_of(channel)); }

  static ChannelKind kind_of(const std::string& channel) {
    if (channel == "shell") return ChannelKind::shell;
    if (channel == "iopub") return ChannelKind::iopub;
    if (channel == "stdin") return ChannelKind::stdin_;
    if (channel == "control") return ChannelKind::control;
    return ChannelKind::hb;
  }

  std::string kernel_connection_file() {
    for (const auto& e : fs::recursive_directory_iterator(dir_ + "/runtime")) {
      if (e.path().extension() == ".json") return e.path().string();
    }
    return {};
  }

  // A client on the hub-side port of `channel`: connects (blocking, on the test thread) and reads
  // the fake kernel's greeting line "<channel> <pid>".
  struct Client {
    asio::io_context io;
    asio::ip::tcp::socket socket{io};
    asio::streambuf buf;
    std::string greeting;
  };
  std::unique_ptr<Client> connect(const char* channel) {
    auto c = std::make_unique<Client>();
    c->socket.connect({asio::ip::address_v4::loopback(), hub_port(channel)});
    asio::read_until(c->socket, c->buf, '\n');
    std::istream in(&c->buf);
    std::getline(in, c->greeting);
    return c;
  }

  static std::string echo(Client& c, const std::string& data) {
    asio::write(c.socket, asio::buffer(data));
    std::string back(data.size(), '\0');
    std::size_t have = std::min(c.buf.size(), data.size());
    asio::buffer_copy(asio::buffer(back), c.buf.data(), have);
    c.buf.consume(have);
    asio::read(c.socket, asio::buffer(back.data() + have, back.size() - have));
    return back;
  }

  asio::io_context io_;
  // Keeps io_.run() going until TearDown releases it.
  using WorkExecutor = decltype(asio::prefer(std::declval<asio::io_context::executor_type>(),
                                             asio::execution::outstanding_work.tracked));
  std::optional<WorkExecutor> work_{
      asio::prefer(io_.get_executor(), asio::execution::outstanding_work.tracked)};
  std::thread io_thread_;
  std::shared_ptr<HubKernel> kernel_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<HubEvent> events_;
  ConnectionInfo hub_;  // as listen() returned it: the bound hub-side ports
  std::string dir_, state_, key_;
  kb::auth::LinkSecret secret_;
  pid_t agent_pid_ = -1;
  nlohmann::json discovery_;
};

TEST_F(HubKernelTest, KernelLifecycleAndRelayThroughTheAgent) {
  // Clients may connect before the link is up: the listeners exist once start() returns.
  start_hub();
  auto listening = wait_event<hub_event::Listening>();
  ASSERT_TRUE(listening);
  for (auto kind : kAllChannelKinds) {
    EXPECT_NE(hub_.port(kind), 0) << "no port was chosen for the " << to_string(kind) << " channel";
    EXPECT_EQ(listening->ports[static_cast<std::size_t>(kind)], hub_.port(kind)) << to_string(kind);
    EXPECT_EQ(listeners_on(hub_.port(kind)).size(), 1u) << "nothing listens on " << hub_.port(kind);
  }

  auto started = wait_event<hub_event::KernelStarted>();
  ASSERT_TRUE(started) << events_text() << agent_log();
  EXPECT_FALSE(started->restart);
  int first_pid = started->pid;
  ASSERT_TRUE(wait_for([&] {
    return fs::exists(state_ + "/kernel-" + std::to_string(first_pid) + ".json");
  })) << agent_log();

  // The connection file: 0600, our key, ip 127.0.0.1; the kernel's ports listen on 127.0.0.1 only.
  std::string cf = kernel_connection_file();
  ASSERT_FALSE(cf.empty());
  struct stat st {};
  ASSERT_EQ(::stat(cf.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(fs::path(cf).parent_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  ConnectionInfo kinfo = read_connection_file(cf);
  EXPECT_EQ(kinfo.key, key_);
  EXPECT_EQ(kinfo.ip, "127.0.0.1");
  EXPECT_EQ(kinfo.signature_scheme, "hmac-sha256");
  EXPECT_EQ(kinfo.kernel_name, "fake");
  for (auto kind : {ChannelKind::shell, ChannelKind::iopub, ChannelKind::stdin_,
                    ChannelKind::control, ChannelKind::hb}) {
    auto where = listeners_on(kinfo.port(kind));
    ASSERT_EQ(where.size(), 1u) << "port " << kinfo.port(kind);
    EXPECT_EQ(where[0], "0100007F")
        << "kernel port " << kinfo.port(kind) << " is not bound to 127.0.0.1 only";
  }

  // Each hub-side port reaches the kernel's port of the same channel; bytes flow both ways.
  std::vector<std::unique_ptr<Client>> clients;
  for (const char* channel : {"shell", "iopub", "stdin", "control", "hb"}) {
    auto c = connect(channel);
    EXPECT_EQ(c->greeting, std::string(channel) + " " + std::to_string(first_pid));
    std::string msg = std::string("ping on ") + channel;
    EXPECT_EQ(echo(*c, msg), msg);
    clients.push_back(std::move(c));
  }
  std::string big(2 * 1024 * 1024, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 + i / 7);
  EXPECT_TRUE(echo(*clients[0], big) == big) << "2 MiB through the shell channel came back altered";

  // Interrupt: SIGINT reaches the kernel process.
  asio::post(io_, [this] { kernel_->interrupt(); });
  EXPECT_TRUE(wait_for([&] { return fs::exists(state_ + "/sigint-" + std::to_string(first_pid)); }))
      << agent_log();

  // Restart: the old kernel is reported gone, a new process starts; old connections are closed,
  // new ones reach the new kernel.
  asio::post(io_, [this] { kernel_->restart(); });
  auto exited = wait_event<hub_event::KernelExited>();
  ASSERT_TRUE(exited) << events_text();
  EXPECT_EQ(exited->signal, SIGTERM);
  EXPECT_FALSE(exited->code);
  auto restarted = wait_event<hub_event::KernelStarted>(2);
  ASSERT_TRUE(restarted) << events_text() << agent_log();
  EXPECT_TRUE(restarted->restart);
  int second_pid = restarted->pid;
  EXPECT_NE(second_pid, first_pid);
  boost::system::error_code ec;
  char byte;
  clients[0]->socket.read_some(asio::buffer(&byte, 1), ec);
  EXPECT_EQ(ec, asio::error::eof) << "a client of the old kernel was not closed: " << ec.message();
  auto shell = connect("shell");
  EXPECT_EQ(shell->greeting, "shell " + std::to_string(second_pid));
  EXPECT_EQ(echo(*shell, "after restart"), "after restart");
  EXPECT_EQ(read_connection_file(kernel_connection_file()).key, key_);

  // Shutdown: the agent stops the kernel and exits 0; the link is closed.
  std::atomic<bool> done{false};
  asio::post(io_, [this, &done] { kernel_->shutdown([&done] { done = true; }); });
  ASSERT_TRUE(wait_for([&] { return done.load(); })) << events_text();
  auto closed = wait_event<hub_event::Closed>();
  ASSERT_TRUE(closed);
  // The second kernel's end was reported before the link closed.
  EXPECT_TRUE(wait_event<hub_event::KernelExited>(2, 1s)) << events_text();
  int status = 0;
  ASSERT_EQ(::waitpid(agent_pid_, &status, 0), agent_pid_);
  agent_pid_ = -1;
  ASSERT_TRUE(WIFEXITED(status)) << agent_log();
  EXPECT_EQ(WEXITSTATUS(status), 0) << agent_log();
  EXPECT_EQ(::kill(second_pid, 0), -1) << "the kernel outlived the agent";
  EXPECT_FALSE(fs::exists(fs::path(cf).parent_path())) << "the agent left its runtime dir behind";
}

TEST_F(HubKernelTest, SigtermToTheAgentIsReportedAndStopsTheKernel) {
  start_hub();
  auto started = wait_event<hub_event::KernelStarted>();
  ASSERT_TRUE(started) << events_text() << agent_log();
  int pid = started->pid;
  ASSERT_TRUE(
      wait_for([&] { return fs::exists(state_ + "/kernel-" + std::to_string(pid) + ".json"); }));
  ::kill(agent_pid_, SIGTERM);
  auto terminating = wait_event<hub_event::AgentTerminating>();
  ASSERT_TRUE(terminating) << events_text() << agent_log();
  EXPECT_NE(terminating->reason.find("SIGTERM"), std::string::npos) << terminating->reason;
  auto exited = wait_event<hub_event::KernelExited>();
  ASSERT_TRUE(exited) << events_text();
  ASSERT_TRUE(wait_event<hub_event::Closed>()) << events_text();
  int status = 0;
  ASSERT_EQ(::waitpid(agent_pid_, &status, 0), agent_pid_);
  agent_pid_ = -1;
  ASSERT_TRUE(WIFEXITED(status)) << agent_log();
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGTERM) << agent_log();
  EXPECT_TRUE(wait_for([&] { return ::kill(pid, 0) != 0; })) << "kernel survived the agent";
}

TEST_F(HubKernelTest, WrongSecretIsRefusedAndNoKernelStarts) {
  secret_ = kb::auth::LinkSecret::generate();  // not the agent's
  start_hub();
  auto error = wait_event<hub_event::Error>();
  ASSERT_TRUE(error) << events_text();
  EXPECT_NE(error->message.find("auth"), std::string::npos) << error->message;
  // A client connecting meanwhile gets nothing (no greeting from any kernel).
  asio::io_context cio;
  asio::ip::tcp::socket s(cio);
  s.connect({asio::ip::address_v4::loopback(), hub_port("shell")});
  s.non_blocking(true);
  char byte;
  boost::system::error_code ec;
  std::this_thread::sleep_for(500ms);
  s.read_some(asio::buffer(&byte, 1), ec);
  EXPECT_EQ(ec, asio::error::would_block);
  EXPECT_FALSE(wait_event<hub_event::LinkUp>(1, 1s));
  EXPECT_FALSE(wait_event<hub_event::KernelStarted>(1, 1s));
  EXPECT_TRUE(fs::is_empty(state_)) << "a kernel was started for an unauthenticated bridge";
}

}  // namespace
}  // namespace kb::tunnel

// HubKernel::adopt refuses descriptors that are not listening TCP sockets, naming the channel, and
// closes every descriptor of the handover (none is left open).
namespace kb::tunnel {
namespace {

TEST(HubKernelAdopt, ARefusedHandoverClosesEveryDescriptorOnce) {
  boost::asio::io_context io;
  HubKernel::Options o;
  o.secret = kb::auth::LinkSecret::generate();
  auto kernel = HubKernel::create(
      io, o, [](std::function<void(TransportResult)>) {}, [](const HubEvent&) {});
  // Two real listeners, then a pipe where the stdin listener should be.
  HubHandover h;
  std::vector<boost::asio::ip::tcp::acceptor> owners;
  for (int i = 0; i < 2; ++i) {
    owners.emplace_back(
        io, boost::asio::ip::tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    h.listeners[i] = ::fcntl(owners.back().native_handle(), F_DUPFD_CLOEXEC, 3);
  }
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  h.listeners[2] = p[0];
  h.listeners[3] = ::dup(p[0]);
  h.listeners[4] = ::dup(p[0]);
  int s[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, s), 0);
  h.link.streams.push_back({1, ChannelKind::shell, 0, 0, false, false, false, s[0]});
  const std::vector<int> given{h.listeners[0], h.listeners[1], h.listeners[2],
                               h.listeners[3], h.listeners[4], s[0]};
  try {
    kernel->adopt(h);
    ADD_FAILURE() << "adopted a pipe as a listener";
  } catch (const HubKernelError& e) {
    EXPECT_NE(std::string(e.what()).find("stdin listener is not a listening TCP socket"),
              std::string::npos)
        << e.what();
  }
  for (int fd : given) EXPECT_EQ(::fcntl(fd, F_GETFD), -1) << "descriptor " << fd << " left open";
  ::close(p[1]);
  ::close(s[1]);
}

}  // namespace
}  // namespace kb::tunnel
