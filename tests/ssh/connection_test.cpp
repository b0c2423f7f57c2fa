// Tests ssh/connection.* against a REAL OpenSSH sshd brought up by tests/sitebox/sitebox.py
// in loopback mode (login = 127.0.0.2, compute = 127.0.0.3). An Asio echo server on the compute
// address stands in for the agent. Everything runs on the test thread's io_context.
#include "ssh/connection.hpp"

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <nlohmann/json.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace asio = boost::asio;
using boost::system::error_code;
using kb::tunnel::ByteTransport;
using kb::tunnel::ByteTransportPtr;
using kb::tunnel::SshConnection;
using kb::tunnel::SshError;
using kb::tunnel::SshOptions;
using namespace std::chrono_literals;

namespace {

std::string source_dir() {
  if (const char* s = std::getenv("KB_SOURCE_DIR")) return s;
  return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path().string();
}

// Runs a shell command, returns its stdout; exit status in *status.
std::string run(const std::string& cmd, int* status = nullptr) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    if (status) *status = -1;
    return out;
  }
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int rc = ::pclose(p);
  if (status) *status = rc;
  return out;
}

std::string sitebox_py() {
  return source_dir() + "/tests/sitebox/sitebox.py";
}

// Runs a few lines of Python with the site's SiteBox object bound to `sb`.
int sitebox_call(const std::string& state_dir, const std::string& code) {
  std::string cmd = "/usr/bin/python3 -c \"import sys; sys.path.insert(0, '" + source_dir() +
                    "/tests/sitebox'); import sitebox; sb = sitebox.attach('" + state_dir + "'); " +
                    code + "\" >>" + state_dir + "/test-sitebox.log 2>&1";
  return std::system(cmd.c_str());
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Generate payloads BEFORE connecting: the event loop does not run meanwhile, and a loop that
// stalls longer than the test's keepalive limit (2 s) rightly declares the connection dead.
std::string random_bytes(std::size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(&s[i], &v, 8);
  }
  for (; i < n; ++i) s[i] = static_cast<char>(rng());
  return s;
}

// Echoes every byte back; counts accepted connections. Stops reading while a write is pending,
// so a client that does not read pushes back all the way (like a real agent would).
class EchoServer {
 public:
  EchoServer(asio::io_context& ioc, const std::string& addr)
      : acceptor_(ioc, asio::ip::tcp::endpoint(asio::ip::make_address(addr), 0)) {
    accept();
  }
  uint16_t port() const { return acceptor_.local_endpoint().port(); }
  int accepted() const { return *accepted_; }
  void stop() {
    error_code ec;
    acceptor_.close(ec);
  }

 private:
  struct Session : std::enable_shared_from_this<Session> {
    explicit Session(asio::ip::tcp::socket s) : sock(std::move(s)) {}
    asio::ip::tcp::socket sock;
    std::array<char, 65536> buf{};
    void read() {
      sock.async_read_some(asio::buffer(buf), [self = shared_from_this()](error_code ec, size_t n) {
        if (ec) return;
        asio::async_write(self->sock, asio::buffer(self->buf.data(), n),
                          [self](error_code ec2, size_t) {
                            if (!ec2) self->read();
                          });
      });
    }
  };
  void accept() {
    acceptor_.async_accept([this, counter = accepted_](error_code ec, asio::ip::tcp::socket s) {
      if (ec) return;
      ++*counter;
      s.set_option(asio::ip::tcp::no_delay(true));
      std::make_shared<Session>(std::move(s))->read();
      accept();
    });
  }
  asio::ip::tcp::acceptor acceptor_;
  std::shared_ptr<int> accepted_ = std::make_shared<int>(0);
};

// Reads from a transport until `want` bytes arrived or an error; heap state so a late handler
// never touches a finished test's stack.
struct Collector : std::enable_shared_from_this<Collector> {
  ByteTransport* t = nullptr;
  std::size_t want = 0;
  std::string data;
  bool done = false;
  error_code ec;
  std::vector<char> buf = std::vector<char>(65536);
  static std::shared_ptr<Collector> start(ByteTransport& t, std::size_t want) {
    auto c = std::make_shared<Collector>();
    c->t = &t;
    c->want = want;
    c->next();
    return c;
  }
  void next() {
    t->async_read_some(asio::buffer(buf), [self = shared_from_this()](error_code ec, size_t n) {
      if (ec) {
        self->ec = ec;
        self->done = true;
        return;
      }
      self->data.append(self->buf.data(), n);
      if (self->data.size() >= self->want) {
        self->done = true;
        return;
      }
      self->next();
    });
  }
};

struct Writer {
  std::shared_ptr<std::string> payload;
  std::shared_ptr<bool> done = std::make_shared<bool>(false);
  std::shared_ptr<error_code> ec = std::make_shared<error_code>();
  std::shared_ptr<std::size_t> written = std::make_shared<std::size_t>(0);
  static Writer start(ByteTransport& t, std::string data) {
    Writer w;
    w.payload = std::make_shared<std::string>(std::move(data));
    t.async_write(asio::buffer(*w.payload),
                  [p = w.payload, d = w.done, e = w.ec, n = w.written](error_code ec, size_t k) {
                    *d = true;
                    *e = ec;
                    *n = k;
                  });
    return w;
  }
};

struct OpenResult {
  bool done = false;
  error_code ec;
  std::string message;
  ByteTransportPtr transport;
};

struct Site {
  std::string dir;
  nlohmann::json info;
  std::string login() const { return info["login_addr"]; }
  std::string compute() const { return info["compute_addr"]; }
  uint16_t port() const { return info["ssh_port"]; }
};
Site* g_site = nullptr;

void site_down() {
  if (!g_site) return;
  run("/usr/bin/python3 " + sitebox_py() + " down --state-dir " + g_site->dir + " >/dev/null 2>&1");
  std::error_code ec;
  std::filesystem::remove_all(g_site->dir, ec);
  delete g_site;
  g_site = nullptr;
}

class SshConnectionTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/kb-ssh-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    g_site = new Site{tmpl, {}};
    std::atexit(site_down);  // also when a test aborts the suite
    int status = 0;
    std::string out = run("/usr/bin/python3 " + sitebox_py() + " up --loopback --state-dir " +
                              g_site->dir + " 2>" + g_site->dir + "-up.log",
                          &status);
    ASSERT_EQ(status, 0) << "sitebox up failed: " << read_file(g_site->dir + "-up.log");
    ::unlink((g_site->dir + "-up.log").c_str());
    g_site->info = nlohmann::json::parse(read_file(g_site->dir + "/site.json"));
  }
  static void TearDownTestSuite() { site_down(); }

  void SetUp() override {
    ASSERT_NE(g_site, nullptr);
    ASSERT_TRUE(g_site->info.contains("ssh_port")) << "site not up";
    echo_ = std::make_unique<EchoServer>(ioc_, g_site->compute());
  }

  SshOptions options() const {
    SshOptions o;
    o.host = g_site->login();
    o.port = g_site->port();
    o.user = g_site->info["ssh_user"];
    o.identity_file = g_site->info["identity"];
    o.known_hosts_file = g_site->info["known_hosts"];
    o.connect_timeout = 10s;
    o.keepalive_interval = 1s;
    o.keepalive_count_max = 2;
    o.backoff_min = 100ms;
    o.backoff_max = 1s;
    return o;
  }

  // Drives the loop until pred holds; the limit only stops a hung test, it asserts nothing.
  template <class Pred>
  bool run_until(Pred pred, std::chrono::seconds limit = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      ioc_.run_one_for(20ms);
    }
    return true;
  }

  std::shared_ptr<OpenResult> open_async(SshConnection& c, const std::string& host, uint16_t port) {
    auto r = std::make_shared<OpenResult>();
    c.async_open_channel(host, port, [r](error_code ec, std::string msg, ByteTransportPtr t) {
      r->done = true;
      r->ec = ec;
      r->message = std::move(msg);
      r->transport = std::move(t);
    });
    return r;
  }

  std::shared_ptr<OpenResult> open(SshConnection& c, const std::string& host, uint16_t port) {
    auto r = open_async(c, host, port);
    EXPECT_TRUE(run_until([&] { return r->done; })) << "open did not complete";
    return r;
  }

  std::shared_ptr<OpenResult> open_echo(SshConnection& c) {
    return open(c, g_site->compute(), echo_->port());
  }

  // Writes payload and reads it back; true if byte-exact.
  void expect_echo(ByteTransport& t, const std::string& payload) {
    auto w = Writer::start(t, payload);
    auto r = Collector::start(t, payload.size());
    ASSERT_TRUE(run_until([&] { return *w.done && r->done; })) << "echo did not finish";
    ASSERT_FALSE(*w.ec) << w.ec->message();
    EXPECT_EQ(*w.written, payload.size());
    ASSERT_FALSE(r->ec) << r->ec.message();
    ASSERT_EQ(r->data.size(), payload.size());
    EXPECT_TRUE(r->data == payload) << "echoed bytes differ";
  }

  std::string host_key_fingerprint() {
    std::string out =
        run("ssh-keygen -l -E sha256 -f " + g_site->info["host_key_pub"].get<std::string>());
    auto b = out.find("SHA256:");
    if (b == std::string::npos) return "?";
    return out.substr(b, out.find(' ', b) - b);
  }

  std::string make_temp_dir() {
    char tmpl[] = "/tmp/kb-ssh-keys-XXXXXX";
    EXPECT_NE(::mkdtemp(tmpl), nullptr);
    temp_dirs_.push_back(tmpl);
    return tmpl;
  }
  void TearDown() override {
    for (auto& d : temp_dirs_) {
      std::error_code ec;
      std::filesystem::remove_all(d, ec);
    }
  }

  asio::io_context ioc_;
  std::unique_ptr<EchoServer> echo_;
  std::vector<std::string> temp_dirs_;
};

TEST_F(SshConnectionTest, EchoesSmallAndLargePayloadsByteExact) {
  const std::string large = random_bytes(8 * 1024 * 1024 + 17, 1);  // several MiB, odd size
  auto conn = SshConnection::create(ioc_, options());
  std::vector<SshConnection::State> states;
  conn->on_state_change([&](SshConnection::State s, const std::string&) { states.push_back(s); });
  auto r = open_echo(*conn);
  ASSERT_FALSE(r->ec) << r->message;
  ASSERT_TRUE(r->transport);
  EXPECT_EQ(conn->state(), SshConnection::State::connected);
  EXPECT_NE(r->transport->describe().find(g_site->compute()), std::string::npos);

  expect_echo(*r->transport, "hello through sshd");
  expect_echo(*r->transport, large);

  auto c = conn->counters();
  EXPECT_GT(c.bytes_out, 8u * 1024 * 1024);
  EXPECT_GT(c.bytes_in, 8u * 1024 * 1024);
  EXPECT_EQ(c.connects, 1u);
  EXPECT_EQ(c.channels_open, 1u);
  EXPECT_EQ(echo_->accepted(), 1);

  // Closing our end sends EOF + close: the echo server sees its connection end.
  r->transport->close();
  run_until([&] { return ioc_.poll() == 0; }, 5s);
  EXPECT_EQ(conn->counters().channels_open, 0u);
  run_until([&] { return !states.empty(); }, 5s);
  ASSERT_GE(states.size(), 2u);
  EXPECT_EQ(states[0], SshConnection::State::connecting);
  EXPECT_EQ(states[1], SshConnection::State::connected);
}

TEST_F(SshConnectionTest, PeerCloseGivesEofAndRefusedPortIsReadable) {
  // A server on the compute address that says "bye" and closes.
  asio::ip::tcp::acceptor closer(ioc_, {asio::ip::make_address(g_site->compute()), 0});
  auto bye = std::make_shared<std::string>("bye");
  closer.async_accept([bye](error_code ec, asio::ip::tcp::socket s) {
    if (ec) return;
    auto sock = std::make_shared<asio::ip::tcp::socket>(std::move(s));
    asio::async_write(*sock, asio::buffer(*bye), [sock](error_code, size_t) {
      error_code ignored;
      sock->shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
      sock->close(ignored);
    });
  });
  auto conn = SshConnection::create(ioc_, options());
  auto r = open(*conn, g_site->compute(), closer.local_endpoint().port());
  ASSERT_FALSE(r->ec) << r->message;
  auto all = Collector::start(*r->transport, 1 << 20);  // more than will ever come
  ASSERT_TRUE(run_until([&] { return all->done; }));
  EXPECT_EQ(all->data, "bye");
  EXPECT_EQ(all->ec, asio::error::eof);
  // Reading again after EOF keeps saying EOF.
  auto again = Collector::start(*r->transport, 1);
  ASSERT_TRUE(run_until([&] { return again->done; }));
  EXPECT_EQ(again->ec, asio::error::eof);

  // A port where nothing listens: sshd's "connect failed" reaches the caller.
  const uint16_t dead_port = closer.local_endpoint().port();
  closer.close();
  auto refused = open(*conn, g_site->compute(), dead_port);
  EXPECT_EQ(refused->ec, make_error_code(SshError::channel_open_refused));
  EXPECT_NE(refused->message.find("connect failed"), std::string::npos) << refused->message;
  EXPECT_EQ(conn->state(), SshConnection::State::connected);
}

TEST_F(SshConnectionTest, TwoHundredChannelsOnOneConnection) {
  constexpr int kChannels = 200;
  std::vector<std::string> payloads;
  for (int i = 0; i < kChannels; ++i) payloads.push_back(random_bytes(32 * 1024 + i, 100 + i));
  auto conn = SshConnection::create(ioc_, options());
  std::vector<std::shared_ptr<OpenResult>> opens;
  for (int i = 0; i < kChannels; ++i)
    opens.push_back(open_async(*conn, g_site->compute(), echo_->port()));
  ASSERT_TRUE(run_until([&] {
    for (auto& o : opens)
      if (!o->done) return false;
    return true;
  }));
  for (auto& o : opens) ASSERT_FALSE(o->ec) << o->message;

  std::vector<Writer> writers;
  std::vector<std::shared_ptr<Collector>> readers;
  for (int i = 0; i < kChannels; ++i) {
    writers.push_back(Writer::start(*opens[i]->transport, payloads[i]));
    readers.push_back(Collector::start(*opens[i]->transport, payloads[i].size()));
  }
  ASSERT_TRUE(run_until([&] {
    for (int i = 0; i < kChannels; ++i)
      if (!*writers[i].done || !readers[i]->done) return false;
    return true;
  }));
  for (int i = 0; i < kChannels; ++i) {
    ASSERT_FALSE(*writers[i].ec) << i << ": " << writers[i].ec->message();
    ASSERT_FALSE(readers[i]->ec) << i << ": " << readers[i]->ec.message();
    EXPECT_TRUE(readers[i]->data == payloads[i]) << "channel " << i << " got other bytes";
  }
  EXPECT_EQ(conn->counters().connects, 1u);
  EXPECT_EQ(conn->counters().channels_open, static_cast<uint64_t>(kChannels));
  EXPECT_EQ(echo_->accepted(), kChannels);
}

TEST_F(SshConnectionTest, SlowReaderDoesNotStallAnotherChannel) {
  const std::string big = random_bytes(64 * 1024 * 1024, 7);
  const std::string small = random_bytes(1024 * 1024, 8);
  auto conn = SshConnection::create(ioc_, options());
  auto a = open_echo(*conn);
  auto b = open_echo(*conn);
  ASSERT_FALSE(a->ec) << a->message;
  ASSERT_FALSE(b->ec) << b->message;

  // A: write far more than every buffer on the path can hold (libssh window, sshd, sockets),
  // and read nothing, so A's echo backs up to its window.
  auto wa = Writer::start(*a->transport, big);
  // Let A fill everything it can.
  for (int i = 0; i < 2000 && ioc_.run_one_for(5ms) > 0; ++i) {
  }
  // B still round-trips while A is stuck.
  expect_echo(*b->transport, small);
  EXPECT_FALSE(*wa.done) << "A's 64 MiB write finished although nobody read A: no backpressure?";

  // Now drain A: everything arrives, in order, and A's write completes.
  auto ra = Collector::start(*a->transport, big.size());
  ASSERT_TRUE(run_until([&] { return *wa.done && ra->done; }, 120s));
  ASSERT_FALSE(*wa.ec) << wa.ec->message();
  ASSERT_FALSE(ra->ec) << ra->ec.message();
  EXPECT_TRUE(ra->data == big);
}

TEST_F(SshConnectionTest, PermitOpenRefusalIsReadable) {
  auto conn = SshConnection::create(ioc_, options());
  // The key may only forward to the compute address; the login address is not allowed.
  auto r = open(*conn, g_site->login(), g_site->port());
  EXPECT_EQ(r->ec, make_error_code(SshError::channel_open_refused));
  EXPECT_FALSE(r->transport);
  EXPECT_NE(r->message.find("administratively prohibited"), std::string::npos) << r->message;
  EXPECT_NE(r->message.find(g_site->login() + ":" + std::to_string(g_site->port())),
            std::string::npos)
      << r->message;
  // The refusal concerns the channel only: the connection stays up and usable.
  EXPECT_EQ(conn->state(), SshConnection::State::connected);
  auto ok = open_echo(*conn);
  ASSERT_FALSE(ok->ec) << ok->message;
  expect_echo(*ok->transport, "still fine");
}

TEST_F(SshConnectionTest, UnknownHostKeyIsRefusedBeforeAuthentication) {
  const std::string dir = make_temp_dir();
  const std::string kh = dir + "/known_hosts";
  std::ofstream(kh).close();  // empty
  auto o = options();
  o.known_hosts_file = kh;
  auto conn = SshConnection::create(ioc_, o);
  std::string failed_reason;
  conn->on_state_change([&](SshConnection::State s, const std::string& why) {
    if (s == SshConnection::State::failed) failed_reason = why;
  });
  auto r = open_echo(*conn);
  EXPECT_EQ(r->ec, make_error_code(SshError::host_key_unknown));
  EXPECT_NE(r->message.find(host_key_fingerprint()), std::string::npos) << r->message;
  EXPECT_NE(r->message.find(kh), std::string::npos) << r->message;
  EXPECT_NE(r->message.find("[" + g_site->login() + "]:" + std::to_string(g_site->port())),
            std::string::npos)
      << r->message;
  EXPECT_NE(r->message.find("the fingerprint with the site"), std::string::npos) << r->message;
  EXPECT_EQ(conn->state(), SshConnection::State::failed);
  EXPECT_EQ(conn->counters().connects, 0u);
  EXPECT_EQ(echo_->accepted(), 0);
  run_until([&] { return !failed_reason.empty(); }, 5s);
  EXPECT_EQ(failed_reason, r->message);

  // Permanent: a second open fails at once with the same reason, no new attempt.
  auto again = open_echo(*conn);
  EXPECT_EQ(again->ec, make_error_code(SshError::host_key_unknown));
  EXPECT_EQ(again->message, r->message);
  EXPECT_EQ(echo_->accepted(), 0);
}

TEST_F(SshConnectionTest, ChangedHostKeyIsRefused) {
  const std::string dir = make_temp_dir();
  int st = 0;
  run("ssh-keygen -q -t ed25519 -N '' -C other -f " + dir + "/other", &st);
  ASSERT_EQ(st, 0);
  std::string pub = read_file(dir + "/other.pub");
  std::string kh = dir + "/known_hosts";
  std::ofstream(kh) << "[" << g_site->login() << "]:" << g_site->port() << " "
                    << pub.substr(0, pub.rfind(' ')) << "\n";
  auto o = options();
  o.known_hosts_file = kh;
  auto conn = SshConnection::create(ioc_, o);
  auto r = open_echo(*conn);
  EXPECT_EQ(r->ec, make_error_code(SshError::host_key_changed));
  EXPECT_NE(r->message.find("CHANGED"), std::string::npos) << r->message;
  EXPECT_NE(r->message.find(host_key_fingerprint()), std::string::npos) << r->message;
  EXPECT_NE(r->message.find(kh), std::string::npos) << r->message;
  EXPECT_EQ(conn->state(), SshConnection::State::failed);
  EXPECT_EQ(echo_->accepted(), 0);
}

TEST_F(SshConnectionTest, WrongIdentityIsAnAuthError) {
  const std::string dir = make_temp_dir();
  int st = 0;
  run("ssh-keygen -q -t ed25519 -N '' -C stranger -f " + dir + "/stranger", &st);
  ASSERT_EQ(st, 0);
  auto o = options();
  o.identity_file = dir + "/stranger";
  auto conn = SshConnection::create(ioc_, o);
  auto r = open_echo(*conn);
  EXPECT_EQ(r->ec, make_error_code(SshError::auth_denied));
  EXPECT_NE(r->message.find(o.user + "@" + g_site->login()), std::string::npos) << r->message;
  EXPECT_NE(r->message.find(o.identity_file), std::string::npos) << r->message;
  EXPECT_EQ(conn->state(), SshConnection::State::failed);
  EXPECT_EQ(echo_->accepted(), 0);

  o.identity_file = dir + "/does-not-exist";
  auto conn2 = SshConnection::create(ioc_, o);
  auto r2 = open_echo(*conn2);
  EXPECT_EQ(r2->ec, make_error_code(SshError::identity_unreadable));
  EXPECT_NE(r2->message.find(o.identity_file), std::string::npos) << r2->message;
}

TEST_F(SshConnectionTest, KilledSshdSessionFailsChannelsAndReconnects) {
  auto conn = SshConnection::create(ioc_, options());
  std::vector<std::pair<SshConnection::State, std::string>> states;
  conn->on_state_change(
      [&](SshConnection::State s, const std::string& why) { states.emplace_back(s, why); });
  auto r = open_echo(*conn);
  ASSERT_FALSE(r->ec) << r->message;
  expect_echo(*r->transport, "before the drop");
  auto pending = Collector::start(*r->transport, 1);

  ASSERT_EQ(sitebox_call(g_site->dir, "sb.kill_sshd_sessions()"), 0);
  ASSERT_TRUE(run_until([&] { return pending->done; }));
  EXPECT_EQ(pending->ec, make_error_code(SshError::connection_lost)) << pending->ec.message();

  // Channels were open, so it reconnects by itself.
  ASSERT_TRUE(run_until([&] { return conn->counters().reconnects >= 1; }));
  EXPECT_EQ(conn->state(), SshConnection::State::connected);
  bool saw_reconnecting = false;
  run_until(
      [&] {
        return !states.empty() && states.back().first == SshConnection::State::connected &&
               states.size() >= 3;
      },
      5s);
  for (auto& [s, why] : states) saw_reconnecting |= s == SshConnection::State::reconnecting;
  EXPECT_TRUE(saw_reconnecting);

  // The old channel stays dead; a new one works.
  auto w = Writer::start(*r->transport, "x");
  ASSERT_TRUE(run_until([&] { return *w.done; }));
  EXPECT_EQ(*w.ec, make_error_code(SshError::connection_lost));
  auto r2 = open_echo(*conn);
  ASSERT_FALSE(r2->ec) << r2->message;
  expect_echo(*r2->transport, random_bytes(256 * 1024, 3));
}

TEST_F(SshConnectionTest, DropWithoutChannelsReconnectsOnDemand) {
  auto conn = SshConnection::create(ioc_, options());
  std::vector<SshConnection::State> states;
  conn->on_state_change([&](SshConnection::State s, const std::string&) { states.push_back(s); });
  auto r = open_echo(*conn);
  ASSERT_FALSE(r->ec) << r->message;
  r->transport.reset();  // no channel open any more
  ASSERT_TRUE(run_until([&] { return conn->counters().channels_open == 0; }));

  ASSERT_EQ(sitebox_call(g_site->dir, "sb.kill_sshd_sessions()"), 0);
  // Nobody needs the connection: it goes idle instead of reconnecting.
  ASSERT_TRUE(run_until([&] { return conn->state() == SshConnection::State::idle; }));
  EXPECT_EQ(conn->counters().connects, 1u);
  EXPECT_FALSE(conn->last_error().empty());

  // The next open brings it back.
  auto r2 = open_echo(*conn);
  ASSERT_FALSE(r2->ec) << r2->message;
  expect_echo(*r2->transport, "on demand");
  EXPECT_EQ(conn->counters().reconnects, 1u);
  run_until([&] { return states.size() >= 4; }, 5s);
  ASSERT_GE(states.size(), 4u);
  EXPECT_EQ(states[2], SshConnection::State::idle);
}

TEST_F(SshConnectionTest, IdleConnectionStaysUpOnKeepalives) {
  // libssh's keepalive request only goes out on every other ssh_send_keepalive() call (the
  // previous reply has to be consumed first); if we got that wrong, a healthy idle connection
  // would be declared dead after two intervals.
  auto conn = SshConnection::create(ioc_, options());  // keepalive every 1 s, dead after 2 s
  auto r = open_echo(*conn);
  ASSERT_FALSE(r->ec) << r->message;
  auto pending = Collector::start(*r->transport, 1);  // a read waits the whole time
  asio::steady_timer idle(ioc_, 6s);
  bool idle_over = false;
  idle.async_wait([&](error_code) { idle_over = true; });
  ASSERT_TRUE(run_until([&] { return idle_over || pending->done; }));
  EXPECT_FALSE(pending->done) << pending->ec.message();
  EXPECT_EQ(conn->state(), SshConnection::State::connected);
  EXPECT_EQ(conn->counters().connects, 1u);
  EXPECT_EQ(conn->counters().reconnects, 0u);
  EXPECT_EQ(conn->last_error(), "");
  // Keepalive traffic flowed both ways while the channel was idle.
  EXPECT_GT(conn->counters().bytes_in, 0u);
  r->transport->close();
}

TEST_F(SshConnectionTest, KeepaliveNoticesAFrozenPeer) {
  auto conn = SshConnection::create(ioc_, options());
  auto r = open_echo(*conn);
  ASSERT_FALSE(r->ec) << r->message;
  auto pending = Collector::start(*r->transport, 1);
  // Freeze the sshd session processes: the TCP connection stays up but nothing answers.
  ASSERT_EQ(
      sitebox_call(g_site->dir,
                   "import os, signal; [os.kill(p, signal.SIGSTOP) for p in sb.sshd_sessions()]"),
      0);
  ASSERT_TRUE(run_until([&] { return pending->done; }));
  EXPECT_EQ(pending->ec, make_error_code(SshError::connection_lost));
  EXPECT_NE(conn->last_error().find("keepalive"), std::string::npos) << conn->last_error();
  // A new session process (the listener is fine) takes over.
  ASSERT_TRUE(run_until([&] { return conn->state() == SshConnection::State::connected; }));
  auto r2 = open_echo(*conn);
  ASSERT_FALSE(r2->ec) << r2->message;
  expect_echo(*r2->transport, "after the freeze");
  // Clean up the frozen processes (and the live session; the connection would just reconnect).
  conn->shutdown();
  EXPECT_EQ(sitebox_call(g_site->dir, "sb.kill_sshd_sessions()"), 0);
}

TEST_F(SshConnectionTest, SshdRestartReconnects) {
  auto conn = SshConnection::create(ioc_, options());
  auto r = open_echo(*conn);
  ASSERT_FALSE(r->ec) << r->message;
  auto pending = Collector::start(*r->transport, 1);
  ASSERT_EQ(sitebox_call(g_site->dir, "sb.restart_sshd()"), 0);
  g_site->info = nlohmann::json::parse(read_file(g_site->dir + "/site.json"));
  ASSERT_TRUE(run_until([&] { return pending->done; }));
  EXPECT_EQ(pending->ec, make_error_code(SshError::connection_lost));
  ASSERT_TRUE(run_until([&] {
    return conn->counters().reconnects >= 1 && conn->state() == SshConnection::State::connected;
  }));
  auto r2 = open_echo(*conn);
  ASSERT_FALSE(r2->ec) << r2->message;
  expect_echo(*r2->transport, "after the restart");
}

TEST_F(SshConnectionTest, OpenWaitsThroughOutageAndShutdownAborts) {
  auto o = options();
  o.port = 1;  // nothing listens: every attempt fails, the open keeps waiting
  o.open_timeout = 0ms;
  auto conn = SshConnection::create(ioc_, o);
  std::vector<SshConnection::State> states;
  conn->on_state_change([&](SshConnection::State s, const std::string&) { states.push_back(s); });
  auto r = open_async(*conn, g_site->compute(), echo_->port());
  ASSERT_TRUE(run_until([&] {
    int n = 0;
    for (auto s : states) n += s == SshConnection::State::reconnecting;
    return n >= 2;
  }));
  EXPECT_FALSE(r->done);
  EXPECT_NE(conn->last_error().find("cannot connect"), std::string::npos) << conn->last_error();
  conn->shutdown();
  ASSERT_TRUE(run_until([&] { return r->done; }));
  EXPECT_EQ(r->ec, asio::error::operation_aborted);

  o.open_timeout = 300ms;
  auto conn2 = SshConnection::create(ioc_, o);
  auto r2 = open(*conn2, g_site->compute(), echo_->port());
  EXPECT_EQ(r2->ec, make_error_code(SshError::open_timeout));
  EXPECT_NE(r2->message.find("cannot connect"), std::string::npos) << r2->message;
}

TEST_F(SshConnectionTest, PoolSharesOneConnectionPerHost) {
  kb::tunnel::SshConnectionPool pool(ioc_);
  auto a = pool.get(options());
  auto b = pool.get(options());
  EXPECT_EQ(a, b);
  auto o = options();
  o.user = "nobody";
  auto c = pool.get(o);
  EXPECT_NE(a, c);
  EXPECT_EQ(pool.size(), 2u);
  auto r1 = open_echo(*a);
  auto r2 = open_echo(*b);
  ASSERT_FALSE(r1->ec) << r1->message;
  ASSERT_FALSE(r2->ec) << r2->message;
  EXPECT_EQ(a->counters().connects, 1u);
  EXPECT_EQ(a->counters().channels_open, 2u);
}

}  // namespace
