// Tests link/session.* (and link/tcp_transport.*): two LinkSessions — bridge and agent —
// with real local TCP sockets on both ends (clients on the bridge side, "kernels" on the agent
// side), over an in-memory pipe, a seeded flaky pipe, and real TCP on 127.0.0.1.
#include "link/session.hpp"

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <random>

#include "common/clock.hpp"
#include "link/frame.hpp"
#include "link/handshake.hpp"
#include "link/tcp_transport.hpp"
#include "tests/link/test_transports.hpp"

namespace kb::tunnel {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;
using testing::make_pipe;

std::vector<std::uint8_t> pattern(std::size_t n, std::uint32_t seed) {
  std::vector<std::uint8_t> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng());
  return v;
}

// Runs the io_context until `done()` or a generous watchdog expires (the watchdog only keeps a
// broken test from hanging; no assertion depends on timing).
bool run_until(asio::io_context& io, const std::function<bool()>& done, int seconds = 60) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  io.restart();
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    io.run_one_for(std::chrono::milliseconds(50));
    io.restart();
  }
  return true;
}

// ---- agent-side "kernels" ---------------------------------------------------------------------

// Accepts connections on 127.0.0.1; each connection gets a behaviour by the port it came in on.
class KernelServer {
 public:
  enum class Mode { echo, flood, greet_and_close, reset };
  KernelServer(asio::io_context& io, Mode mode, std::size_t flood_bytes = 0)
      : io_(io),
        acceptor_(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)),
        mode_(mode),
        flood_(pattern(flood_bytes, 99)) {
    accept();
  }
  tcp::endpoint endpoint() const { return acceptor_.local_endpoint(); }
  int accepted = 0;
  std::size_t flood_written = 0;
  bool flood_done = false;
  std::size_t eof_seen = 0;  // connections whose client side finished writing

 private:
  struct Conn {
    explicit Conn(tcp::socket s) : socket(std::move(s)) {}
    tcp::socket socket;
    std::vector<std::uint8_t> buf = std::vector<std::uint8_t>(64 * 1024);
  };
  void accept() {
    acceptor_.async_accept([this](error_code ec, tcp::socket s) {
      if (ec) return;
      ++accepted;
      s.set_option(tcp::no_delay(true));
      auto c = std::make_shared<Conn>(std::move(s));
      switch (mode_) {
        case Mode::echo:
          echo(c);
          break;
        case Mode::flood:
          c->socket.set_option(asio::socket_base::send_buffer_size(64 * 1024));
          flood(c, 0);
          break;
        case Mode::greet_and_close: {
          static const std::string hello = "hello from the kernel";
          asio::write(c->socket, asio::buffer(hello));
          error_code ignored;
          c->socket.shutdown(tcp::socket::shutdown_send, ignored);
          drain(c);
          break;
        }
        case Mode::reset: {
          error_code ignored;
          c->socket.set_option(asio::socket_base::linger(true, 0), ignored);
          c->socket.close(ignored);
          break;
        }
      }
      accept();
    });
  }
  void echo(std::shared_ptr<Conn> c) {
    c->socket.async_read_some(asio::buffer(c->buf), [this, c](error_code ec, std::size_t n) {
      if (ec) {
        if (ec == asio::error::eof) {
          ++eof_seen;
          error_code ignored;
          c->socket.shutdown(tcp::socket::shutdown_send, ignored);
        }
        return;
      }
      asio::async_write(c->socket, asio::buffer(c->buf.data(), n),
                        [this, c](error_code ec, std::size_t) {
                          if (!ec) echo(c);
                        });
    });
  }
  void drain(std::shared_ptr<Conn> c) {
    c->socket.async_read_some(asio::buffer(c->buf), [this, c](error_code ec, std::size_t) {
      if (ec) {
        if (ec == asio::error::eof) ++eof_seen;
        return;
      }
      drain(c);
    });
  }
  void flood(std::shared_ptr<Conn> c, std::size_t off) {
    if (off == flood_.size()) {
      flood_done = true;
      error_code ignored;
      c->socket.shutdown(tcp::socket::shutdown_send, ignored);
      drain(c);
      return;
    }
    const std::size_t n = std::min<std::size_t>(16 * 1024, flood_.size() - off);
    asio::async_write(c->socket, asio::buffer(flood_.data() + off, n),
                      [this, c, off](error_code ec, std::size_t w) {
                        if (ec) return;
                        flood_written += w;
                        flood(c, off + w);
                      });
  }

  asio::io_context& io_;
  tcp::acceptor acceptor_;
  Mode mode_;
  std::vector<std::uint8_t> flood_;
};

// ---- bridge-side clients ----------------------------------------------------------------------

// Writes `data` in random-sized pieces, half-closes, and checks that exactly `expect` comes back,
// in order, followed by EOF.
class Client : public std::enable_shared_from_this<Client> {
 public:
  Client(asio::io_context& io, std::vector<std::uint8_t> data, std::vector<std::uint8_t> expect,
         std::uint32_t seed)
      : socket(io), data_(std::move(data)), expect_(std::move(expect)), rng_(seed) {}
  tcp::socket socket;
  bool done = false;  // everything expected arrived, then EOF
  bool failed = false;
  std::string failure;
  std::size_t received = 0;
  bool error_seen = false;  // the connection ended with an error (reset)
  bool reading = true;

  void start() {
    write_more();
    if (reading) read_more();
  }
  void read_more() {
    auto self = shared_from_this();
    socket.async_read_some(asio::buffer(buf_), [self](error_code ec, std::size_t n) {
      if (ec) {
        if (ec == asio::error::eof) {
          if (self->received == self->expect_.size()) {
            self->done = true;
          } else {
            self->fail("EOF after " + std::to_string(self->received) + " of " +
                       std::to_string(self->expect_.size()) + " bytes");
          }
        } else {
          self->error_seen = true;
          if (self->received != self->expect_.size()) self->fail("read error: " + ec.message());
        }
        return;
      }
      if (self->received + n > self->expect_.size() ||
          std::memcmp(self->buf_.data(), self->expect_.data() + self->received, n) != 0) {
        self->fail("byte mismatch at offset " + std::to_string(self->received));
        return;
      }
      self->received += n;
      self->read_more();
    });
  }

 private:
  void fail(std::string why) {
    if (!failed) failure = std::move(why);
    failed = true;
  }
  void write_more() {
    if (written_ == data_.size()) {
      error_code ignored;
      socket.shutdown(tcp::socket::shutdown_send, ignored);
      return;
    }
    const std::size_t n = std::min<std::size_t>(data_.size() - written_, 1 + rng_() % (48 * 1024));
    auto self = shared_from_this();
    asio::async_write(socket, asio::buffer(data_.data() + written_, n),
                      [self](error_code ec, std::size_t w) {
                        if (ec) return;
                        self->written_ += w;
                        self->write_more();
                      });
  }
  std::vector<std::uint8_t> data_, expect_;
  std::size_t written_ = 0;
  std::mt19937 rng_;
  std::array<std::uint8_t, 64 * 1024> buf_{};
};

// ---- the two ends -----------------------------------------------------------------------------

struct LinkPair {
  explicit LinkPair(LinkSession::Options opts = {}, bool same_secret = true,
                    std::optional<LinkSession::Options> agent_opts = std::nullopt)
      : bridge_secret(auth::LinkSecret::generate()),
        agent_secret(same_secret ? bridge_secret : auth::LinkSecret::generate()),
        listener(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)) {
    opts.log_id = "test";
    LinkSession::Handlers bh;
    bh.on_state = [this](LinkState s, const std::string& why) {
      bridge_states.push_back({s, why});
      if (on_bridge_state) on_bridge_state(s, why);
    };
    bh.on_control = [this](const nlohmann::json& j) { bridge_controls.push_back(j); };
    bh.on_candidate_failed = [this](const std::string& why) {
      bridge_failures.push_back(why);
      if (on_bridge_candidate_failed) on_bridge_candidate_failed(why);
    };
    bridge = LinkSession::create(io, LinkSession::Role::bridge, bridge_secret, opts, bh);
    if (agent_opts) agent_opts->log_id = "test";
    agent = make_agent(agent_secret, agent_opts ? *agent_opts : opts);
  }

  std::shared_ptr<LinkSession> make_agent(const auth::LinkSecret& secret,
                                          LinkSession::Options opts) {
    LinkSession::Handlers ah;
    ah.on_state = [this](LinkState s, const std::string& why) { agent_states.push_back({s, why}); };
    ah.on_control = [this](const nlohmann::json& j) { agent_controls.push_back(j); };
    ah.on_candidate_failed = [this](const std::string& why) { agent_failures.push_back(why); };
    ah.on_stream_request = [this](std::uint32_t id, ChannelKind kind) {
      on_stream_request(id, kind);
    };
    return LinkSession::create(io, LinkSession::Role::agent, secret, opts, ah);
  }

  // Agent side: connect to the kernel server of this channel kind, then attach.
  void on_stream_request(std::uint32_t id, ChannelKind kind) {
    if (hold_requests) return;  // the kernel is "not listening yet": data must wait, bounded
    auto it = kernels.find(kind);
    if (it == kernels.end()) {
      current_agent()->refuse_stream(id, std::string("no kernel for ") + to_string(kind));
      return;
    }
    auto sock = std::make_shared<tcp::socket>(io);
    sock->open(tcp::v4());
    sock->set_option(asio::socket_base::receive_buffer_size(64 * 1024));
    auto agent_now = current_agent();
    sock->async_connect(it->second->endpoint(), [sock, id, agent_now](error_code ec) {
      if (ec) {
        agent_now->refuse_stream(id, "kernel refused: " + ec.message());
        return;
      }
      agent_now->attach_stream(id, std::move(*sock));
    });
  }
  std::shared_ptr<LinkSession> current_agent() { return agent2 ? agent2 : agent; }

  // A client connection on the bridge side, adopted as a stream of `kind`.
  std::shared_ptr<Client> open_client(ChannelKind kind, std::vector<std::uint8_t> data,
                                      std::vector<std::uint8_t> expect, std::uint32_t seed,
                                      bool reading = true) {
    auto c = std::make_shared<Client>(io, std::move(data), std::move(expect), seed);
    c->reading = reading;
    c->socket.open(tcp::v4());
    if (!reading) c->socket.set_option(asio::socket_base::receive_buffer_size(32 * 1024));
    c->socket.connect(listener.local_endpoint());
    tcp::socket accepted = listener.accept();
    if (!reading) accepted.set_option(asio::socket_base::send_buffer_size(32 * 1024));
    EXPECT_NE(bridge->add_local_stream(kind, std::move(accepted)), 0u);
    c->start();
    clients.push_back(c);
    return c;
  }

  // Connects bridge and agent through a fresh pipe; with budgets, a flaky one that cuts after
  // the bridge wrote/read or the agent wrote/read that many bytes (whichever comes first).
  struct Budgets {
    std::size_t bridge_write, bridge_read, agent_write, agent_read;
  };
  std::shared_ptr<testing::MemoryPipe> connect_pipe(std::optional<Budgets> budgets = std::nullopt,
                                                    std::size_t capacity = 256 * 1024) {
    std::shared_ptr<testing::MemoryPipe> pipe;
    auto [b, a] = make_pipe(io, &pipe, capacity, "pipe" + std::to_string(++connects));
    ByteTransportPtr bt = std::move(b), at = std::move(a);
    if (budgets) {
      bt = std::make_unique<testing::FlakyTransport>(io, std::move(bt), budgets->bridge_write,
                                                     budgets->bridge_read);
      at = std::make_unique<testing::FlakyTransport>(io, std::move(at), budgets->agent_write,
                                                     budgets->agent_read);
    }
    bridge->attach_transport(std::move(bt));
    current_agent()->attach_transport(std::move(at));
    return pipe;
  }

  bool all_clients_done() const {
    for (auto& c : clients) {
      if (c->failed || !c->done) return false;
    }
    return true;
  }
  bool any_client_failed() const {
    for (auto& c : clients) {
      if (c->failed) return true;
    }
    return false;
  }
  std::string client_failures() const {
    std::string s;
    for (std::size_t i = 0; i < clients.size(); ++i) {
      if (clients[i]->failed)
        s += "client " + std::to_string(i) + ": " + clients[i]->failure + "\n";
    }
    return s;
  }

  asio::io_context io;
  auth::LinkSecret bridge_secret, agent_secret;
  tcp::acceptor listener;
  std::shared_ptr<LinkSession> bridge, agent, agent2;
  std::map<ChannelKind, std::unique_ptr<KernelServer>> kernels;
  std::vector<std::shared_ptr<Client>> clients;
  std::vector<std::pair<LinkState, std::string>> bridge_states, agent_states;
  std::vector<nlohmann::json> bridge_controls, agent_controls;
  std::vector<std::string> bridge_failures, agent_failures;
  std::function<void(LinkState, const std::string&)> on_bridge_state;
  std::function<void(const std::string&)> on_bridge_candidate_failed;
  int connects = 0;
  bool hold_requests = false;
};

void add_echo_kernels(LinkPair& p) {
  for (auto k : {ChannelKind::shell, ChannelKind::iopub, ChannelKind::stdin_, ChannelKind::control,
                 ChannelKind::hb}) {
    p.kernels[k] = std::make_unique<KernelServer>(p.io, KernelServer::Mode::echo);
  }
}

const ChannelKind kKinds[] = {ChannelKind::shell, ChannelKind::iopub, ChannelKind::stdin_,
                              ChannelKind::control, ChannelKind::hb};

// ---- relay ------------------------------------------------------------------------------------

TEST(LinkSession, RelaysManyStreamsByteExactOverAPipe) {
  LinkPair p;
  add_echo_kernels(p);
  // Streams opened before any transport exists: their bytes wait until the link is up.
  std::uint64_t total = 0;
  for (int i = 0; i < 20; ++i) {
    auto data = pattern(50'000 + 7'919 * i, 1000 + i);
    total += data.size();
    p.open_client(kKinds[i % 5], data, data, i);
  }
  p.connect_pipe();
  ASSERT_TRUE(run_until(p.io, [&] { return p.all_clients_done() || p.any_client_failed(); }))
      << "relay did not finish";
  ASSERT_TRUE(p.all_clients_done()) << p.client_failures();
  EXPECT_EQ(p.bridge->state(), LinkState::up);
  EXPECT_EQ(p.agent->state(), LinkState::up);
  const auto bs = p.bridge->stats();
  const auto as = p.agent->stats();
  std::uint64_t out = 0, in = 0;
  for (std::size_t k = 0; k < kChannelKinds; ++k) {
    out += bs.stream_bytes_out[k];
    in += as.stream_bytes_in[k];
  }
  EXPECT_EQ(out, total);
  EXPECT_EQ(in, total);
  EXPECT_EQ(bs.streams_opened, 20u);
  // Every stream ended cleanly on both sides (half-closes met in the middle).
  ASSERT_TRUE(run_until(
      p.io, [&] { return p.bridge->stats().streams == 0 && p.agent->stats().streams == 0; }));
  EXPECT_EQ(bs.resumes, 0u);
}

TEST(LinkSession, RelaysOverRealTcpOnLoopback) {
  LinkPair p;
  add_echo_kernels(p);
  tcp::acceptor agent_listener(p.io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  agent_listener.async_accept([&](error_code ec, tcp::socket s) {
    ASSERT_FALSE(ec);
    p.agent->attach_transport(make_tcp_transport(std::move(s)));
  });
  tcp::socket to_agent(p.io);
  to_agent.connect(agent_listener.local_endpoint());
  p.bridge->attach_transport(make_tcp_transport(std::move(to_agent)));
  for (int i = 0; i < 10; ++i) {
    auto data = pattern(300'000 + 1'000 * i, 2000 + i);
    p.open_client(kKinds[i % 5], data, data, i);
  }
  ASSERT_TRUE(run_until(p.io, [&] { return p.all_clients_done() || p.any_client_failed(); }));
  ASSERT_TRUE(p.all_clients_done()) << p.client_failures();
  ASSERT_FALSE(p.bridge_states.empty());
  EXPECT_EQ(p.bridge_states.front().first, LinkState::up);
  EXPECT_NE(p.bridge_states.front().second.find("tcp:127.0.0.1"), std::string::npos);
}

// ---- resume -----------------------------------------------------------------------------------

TEST(LinkSession, ResumesByteExactThroughHundredsOfRandomDrops) {
  LinkSession::Options opts;
  opts.handshake_timeout = std::chrono::milliseconds(2000);
  // Frames smaller than most budgets below, so that most transports carry whole frames before the
  // cut. (With the default 64 KiB chunk, no transport cut below 64 KiB could ever deliver a full
  // DATA frame and the link could not make progress: a retransmission restarts at a frame
  // boundary.)
  opts.max_chunk = 16 * 1024;
  LinkPair p(opts);
  add_echo_kernels(p);
  std::mt19937_64 rng(20261126);  // seeded: a failure replays
  // Budgets from 1 byte (cut inside the handshake) to 64 KiB (cut after a few frames).
  auto budget = [&] { return static_cast<std::size_t>(1 + rng() % 65536); };
  bool connect_pending = false;
  int controls_sent = 0;
  auto reconnect = [&] {
    if (connect_pending || p.all_clients_done()) return;
    connect_pending = true;
    asio::post(p.io, [&] {
      connect_pending = false;
      p.connect_pipe(LinkPair::Budgets{budget(), budget(), budget(), budget()});
      // Control messages from both sides, interleaved with the drops, must arrive once, in order.
      p.bridge->send_control({{"n", controls_sent}});
      p.agent->send_control({{"n", controls_sent}});
      ++controls_sent;
    });
  };
  p.on_bridge_state = [&](LinkState s, const std::string&) {
    if (s == LinkState::down) reconnect();
  };
  p.on_bridge_candidate_failed = [&](const std::string&) { reconnect(); };
  for (int i = 0; i < 10; ++i) {
    auto data = pattern(600'000 + 3'001 * i, 3000 + i);
    p.open_client(kKinds[i % 5], data, data, i);
  }
  reconnect();
  ASSERT_TRUE(run_until(
      p.io, [&] { return p.all_clients_done() || p.any_client_failed(); }, 120))
      << "relay did not finish after " << p.connects << " connections";
  ASSERT_TRUE(p.all_clients_done()) << p.client_failures();
  EXPECT_GE(p.connects, 200) << "the test must exercise hundreds of drops";
  std::printf("connections: %d, resumes: %llu, retransmitted: %llu bytes\n", p.connects,
              static_cast<unsigned long long>(p.bridge->stats().resumes),
              static_cast<unsigned long long>(p.bridge->stats().retransmitted_bytes));
  EXPECT_GE(p.bridge->stats().resumes, 100u);
  EXPECT_GT(p.bridge->stats().retransmitted_bytes, 0u);
  // Let the last control messages through (the last connection may still be up).
  p.on_bridge_state = [&](LinkState s, const std::string&) {
    if (s == LinkState::down) p.connect_pipe();
  };
  p.on_bridge_candidate_failed = [&](const std::string&) { p.connect_pipe(); };
  if (p.bridge->state() != LinkState::up) p.connect_pipe();
  ASSERT_TRUE(run_until(p.io, [&] {
    return static_cast<int>(p.bridge_controls.size()) == controls_sent &&
           static_cast<int>(p.agent_controls.size()) == controls_sent;
  }));
  for (int i = 0; i < controls_sent; ++i) {
    EXPECT_EQ(p.agent_controls[i]["n"], i);
    EXPECT_EQ(p.bridge_controls[i]["n"], i);
  }
  EXPECT_EQ(p.bridge_states.front().first, LinkState::up);
  for (auto& [s, why] : p.bridge_states) EXPECT_NE(s, LinkState::closed) << why;
}

TEST(LinkSession, LocalSocketsStayOpenWhileTheLinkIsDown) {
  LinkPair p;
  add_echo_kernels(p);
  auto first = pattern(10'000, 1), second = pattern(10'000, 2);
  std::vector<std::uint8_t> both = first;
  both.insert(both.end(), second.begin(), second.end());
  // A client that sends `first`, waits for the outage, then sends `second`.
  auto c = std::make_shared<Client>(p.io, first, both, 5);
  c->socket.connect(p.listener.local_endpoint());
  p.bridge->add_local_stream(ChannelKind::shell, p.listener.accept());
  auto pipe = p.connect_pipe();
  asio::write(c->socket, asio::buffer(first));
  std::vector<std::uint8_t> echoed(first.size());
  std::size_t got = 0;
  std::function<void()> rd = [&] {
    c->socket.async_read_some(asio::buffer(echoed.data() + got, echoed.size() - got),
                              [&](error_code ec, std::size_t n) {
                                if (ec) return;
                                got += n;
                                if (got < echoed.size()) rd();
                              });
  };
  rd();
  ASSERT_TRUE(run_until(p.io, [&] { return got == first.size(); }));
  EXPECT_EQ(echoed, first);
  pipe->close(0);  // the transport dies
  ASSERT_TRUE(run_until(p.io, [&] {
    return p.bridge->state() == LinkState::down && p.agent->state() == LinkState::down;
  }));
  // Bytes written during the outage are held, not lost; the socket is still open.
  asio::write(c->socket, asio::buffer(second));
  error_code ignored;
  c->socket.shutdown(tcp::socket::shutdown_send, ignored);
  got = 0;
  echoed.assign(second.size(), 0);
  rd();
  p.connect_pipe();
  ASSERT_TRUE(run_until(p.io, [&] { return got == second.size(); }));
  EXPECT_EQ(echoed, second);
  EXPECT_EQ(p.bridge->stats().resumes, 1u);
}

// ---- flow control -----------------------------------------------------------------------------

TEST(LinkSession, StalledSinkAppliesBackpressureWithoutDropWhileHeartbeatsFlow) {
  LinkSession::Options opts;
  opts.stream_window = 64 * 1024;
  opts.replay_limit = 256 * 1024;
  LinkPair p(opts);
  const std::size_t kFlood = 32 * 1024 * 1024;
  p.kernels[ChannelKind::iopub] =
      std::make_unique<KernelServer>(p.io, KernelServer::Mode::flood, kFlood);
  p.kernels[ChannelKind::hb] = std::make_unique<KernelServer>(p.io, KernelServer::Mode::echo);
  p.connect_pipe();
  // The iopub client does not read at all.
  auto flood_expect = pattern(kFlood, 99);
  auto iopub = p.open_client(ChannelKind::iopub, {}, flood_expect, 1, /*reading=*/false);
  ASSERT_TRUE(
      run_until(p.io, [&] { return p.kernels[ChannelKind::iopub]->flood_written > 200 * 1024; }));
  // Heartbeats: 200 round trips, one at a time, while iopub is stuck.
  auto hb = std::make_shared<tcp::socket>(p.io);
  hb->connect(p.listener.local_endpoint());
  p.bridge->add_local_stream(ChannelKind::hb, p.listener.accept());
  int rounds = 0;
  std::array<char, 4> reply{};
  std::function<void()> ping = [&] {
    asio::async_write(*hb, asio::buffer("ping", 4), [&](error_code ec, std::size_t) {
      ASSERT_FALSE(ec);
      asio::async_read(*hb, asio::buffer(reply), [&](error_code ec, std::size_t) {
        ASSERT_FALSE(ec);
        ASSERT_EQ(std::string(reply.data(), 4), "ping");
        if (++rounds < 200) ping();
      });
    });
  };
  ping();
  ASSERT_TRUE(run_until(p.io, [&] { return rounds == 200; })) << rounds << " heartbeats";
  // Backpressure reached the kernel: it could not write everything, and nothing piled up in the
  // link beyond its limits.
  EXPECT_FALSE(p.kernels[ChannelKind::iopub]->flood_done);
  EXPECT_LT(p.kernels[ChannelKind::iopub]->flood_written, kFlood);
  EXPECT_LE(p.agent->stats().replay_bytes, opts.replay_limit + opts.max_chunk + 1024);
  EXPECT_LE(p.bridge->stats().replay_bytes, opts.replay_limit + opts.max_chunk + 1024);
  EXPECT_EQ(iopub->received, 0u);
  // Now the sink reads: every byte arrives, in order, then EOF.
  iopub->read_more();
  ASSERT_TRUE(run_until(
      p.io, [&] { return iopub->done || iopub->failed; }, 120));
  EXPECT_TRUE(iopub->done) << iopub->failure;
  EXPECT_EQ(iopub->received, kFlood);
}

TEST(LinkSession, PeerThatStopsReadingIsDetectedAndTheLinkRecovers) {
  LinkSession::Options opts;
  opts.replay_limit = 256 * 1024;
  opts.liveness_timeout = std::chrono::milliseconds(300);
  LinkSession::Options agent_opts = opts;
  agent_opts.liveness_timeout = std::chrono::seconds(60);  // only the bridge's detection is tested
  LinkPair p(opts, true, agent_opts);
  add_echo_kernels(p);
  auto pipe = p.connect_pipe(std::nullopt, 64 * 1024);
  ASSERT_TRUE(run_until(p.io, [&] { return p.bridge->state() == LinkState::up; }));
  pipe->stall(1, true);  // the agent's end stops reading
  auto data = pattern(2 * 1024 * 1024, 7);
  auto c = p.open_client(ChannelKind::shell, data, data, 3);
  std::size_t max_replay = 0;
  ASSERT_TRUE(run_until(p.io, [&] {
    max_replay = std::max(max_replay, p.bridge->stats().replay_bytes);
    return p.bridge->state() == LinkState::down;
  }));
  EXPECT_LE(max_replay, opts.replay_limit + opts.max_chunk + 1024);
  bool reason_found = false;
  for (auto& [s, why] : p.bridge_states) {
    // Either symptom of a peer that stopped reading: our frames are not acknowledged, or (since an
    // idle peer would answer pings) nothing arrives at all.
    if (s == LinkState::down && (why.find("no acknowledgement") != std::string::npos ||
                                 why.find("nothing received") != std::string::npos)) {
      reason_found = true;
    }
  }
  EXPECT_TRUE(reason_found) << p.bridge_states.back().second;
  p.connect_pipe();
  ASSERT_TRUE(run_until(p.io, [&] { return c->done || c->failed; }));
  EXPECT_TRUE(c->done) << c->failure;
}

// ---- half-close and close ---------------------------------------------------------------------

TEST(LinkSession, KernelCloseReachesTheClientAndClientCloseReachesTheKernel) {
  LinkPair p;
  p.kernels[ChannelKind::shell] =
      std::make_unique<KernelServer>(p.io, KernelServer::Mode::greet_and_close);
  p.connect_pipe();
  const std::string hello = "hello from the kernel";
  auto c = p.open_client(ChannelKind::shell, {},
                         std::vector<std::uint8_t>(hello.begin(), hello.end()), 1);
  // The kernel half-closes after its greeting: the client gets the bytes, then EOF. The client had
  // nothing to send and half-closed at once: the kernel sees EOF.
  ASSERT_TRUE(run_until(p.io, [&] {
    return (c->done || c->failed) && p.kernels[ChannelKind::shell]->eof_seen == 1;
  }));
  EXPECT_TRUE(c->done) << c->failure;
  ASSERT_TRUE(run_until(
      p.io, [&] { return p.bridge->stats().streams == 0 && p.agent->stats().streams == 0; }));
}

TEST(LinkSession, DataAndFinHeldUntilTheKernelConnectionIsAttached) {
  LinkPair p;
  add_echo_kernels(p);
  p.hold_requests = true;  // the kernel does not listen yet
  p.connect_pipe();
  auto data = pattern(30'000, 4);
  auto c = p.open_client(ChannelKind::shell, data, data, 1);    // writes everything, then FIN
  auto empty = p.open_client(ChannelKind::control, {}, {}, 2);  // only a FIN
  ASSERT_TRUE(run_until(p.io, [&] { return p.agent->stats().stream_bytes_in[0] == data.size(); }));
  p.io.restart();
  while (p.io.poll() > 0) p.io.restart();  // let the FINs arrive too
  p.hold_requests = false;
  p.on_stream_request(1, ChannelKind::shell);  // now the kernel answers
  p.on_stream_request(2, ChannelKind::control);
  ASSERT_TRUE(
      run_until(p.io, [&] { return (c->done || c->failed) && (empty->done || empty->failed); }));
  EXPECT_TRUE(c->done) << c->failure;
  EXPECT_TRUE(empty->done) << empty->failure;
  EXPECT_EQ(p.kernels[ChannelKind::shell]->eof_seen, 1u);
  EXPECT_EQ(p.kernels[ChannelKind::control]->eof_seen, 1u);
}

TEST(LinkSession, KernelResetAndRefusalReachTheClient) {
  LinkPair p;
  p.kernels[ChannelKind::control] = std::make_unique<KernelServer>(p.io, KernelServer::Mode::reset);
  p.connect_pipe();
  auto reset = p.open_client(ChannelKind::control, {}, {}, 1);
  auto refused = p.open_client(ChannelKind::stdin_, {}, {}, 2);  // no stdin kernel: refused
  ASSERT_TRUE(run_until(p.io, [&] {
    return (reset->done || reset->error_seen) && (refused->done || refused->error_seen);
  }));
  EXPECT_TRUE(refused->error_seen) << "a refused stream ends with a reset, not a clean EOF";
  ASSERT_TRUE(run_until(
      p.io, [&] { return p.bridge->stats().streams == 0 && p.agent->stats().streams == 0; }));
  EXPECT_EQ(p.bridge->state(), LinkState::up);  // a stream error never takes the link down
}

// ---- authentication and identity --------------------------------------------------------------

TEST(LinkSession, WrongSecretForwardsNothing) {
  LinkPair p({}, /*same_secret=*/false);
  add_echo_kernels(p);
  auto data = pattern(5000, 1);
  auto c = p.open_client(ChannelKind::shell, data, data, 1);
  p.connect_pipe();
  ASSERT_TRUE(
      run_until(p.io, [&] { return !p.bridge_failures.empty() && !p.agent_failures.empty(); }));
  EXPECT_NE(p.bridge_failures[0].find("authentication failed"), std::string::npos)
      << p.bridge_failures[0];
  EXPECT_NE(p.agent_failures[0].find("refused"), std::string::npos) << p.agent_failures[0];
  EXPECT_EQ(p.bridge->state(), LinkState::connecting);
  EXPECT_EQ(p.agent->state(), LinkState::connecting);
  for (std::size_t k = 0; k < kChannelKinds; ++k) {
    EXPECT_EQ(p.bridge->stats().stream_bytes_out[k], 0u);
    EXPECT_EQ(p.agent->stats().stream_bytes_in[k], 0u);
  }
  for (auto& [kind, k] : p.kernels) EXPECT_EQ(k->accepted, 0);
  EXPECT_EQ(c->received, 0u);
}

TEST(LinkSession, FailedKnockDoesNotDisturbTheLiveLink) {
  LinkPair p;
  add_echo_kernels(p);
  p.connect_pipe();
  for (int i = 0; i < 5; ++i) {
    auto data = pattern(400'000, 50 + i);
    p.open_client(kKinds[i], data, data, i);
  }
  ASSERT_TRUE(run_until(p.io, [&] { return p.agent->stats().stream_bytes_in[0] > 100'000; }));
  // Knocks with the wrong secret while data flows.
  std::vector<std::shared_ptr<LinkSession>> impostors;
  for (int i = 0; i < 3; ++i) {
    auto imp =
        LinkSession::create(p.io, LinkSession::Role::bridge, auth::LinkSecret::generate(), {}, {});
    auto [i_end, a_end] = make_pipe(p.io);
    imp->attach_transport(std::move(i_end));
    p.agent->attach_transport(std::move(a_end));
    impostors.push_back(imp);
  }
  ASSERT_TRUE(run_until(p.io, [&] { return p.all_clients_done() || p.any_client_failed(); }));
  ASSERT_TRUE(p.all_clients_done()) << p.client_failures();
  EXPECT_EQ(p.agent->stats().auth_failures, 3u);
  EXPECT_EQ(p.agent->stats().resumes, 0u);
  EXPECT_EQ(p.agent->state(), LinkState::up);
  ASSERT_EQ(p.agent_states.size(), 1u);
}

TEST(LinkSession, AgentRestartClosesTheBridgeSessionWithAClearReason) {
  LinkPair p;
  add_echo_kernels(p);
  auto pipe = p.connect_pipe();
  auto data = pattern(10'000, 1);
  auto c = p.open_client(ChannelKind::shell, data, data, 1);
  ASSERT_TRUE(run_until(p.io, [&] { return c->done || c->failed; }));
  auto c2 = p.open_client(ChannelKind::iopub, {}, {}, 2, /*reading=*/true);
  pipe->close(0);
  ASSERT_TRUE(run_until(p.io, [&] { return p.bridge->state() == LinkState::down; }));
  // The agent process restarted: same secret, new session.
  p.agent2 = p.make_agent(p.agent_secret, {});
  p.connect_pipe();
  ASSERT_TRUE(run_until(p.io, [&] { return p.bridge->state() == LinkState::closed; }));
  ASSERT_FALSE(p.bridge_states.empty());
  EXPECT_EQ(p.bridge_states.back().first, LinkState::closed);
  EXPECT_NE(p.bridge_states.back().second.find("agent restarted"), std::string::npos)
      << p.bridge_states.back().second;
  // The new agent is not harmed: it still waits for a bridge that knows it.
  EXPECT_NE(p.agent2->state(), LinkState::closed);
  ASSERT_TRUE(run_until(p.io, [&] { return c2->done || c2->error_seen || c2->failed; }));
}

TEST(LinkSession, BridgeRestartClosesTheStaleAgentSessionAndANewOneWorks) {
  LinkPair p;
  add_echo_kernels(p);
  auto pipe = p.connect_pipe();
  auto data = pattern(10'000, 1);
  auto c = p.open_client(ChannelKind::shell, data, data, 1);
  ASSERT_TRUE(run_until(p.io, [&] { return c->done || c->failed; }));
  // The bridge process restarts: a new bridge session with the same secret knocks.
  p.bridge.reset();
  std::vector<std::string> b2_failures;
  std::vector<LinkState> b2_states;
  LinkSession::Handlers bh;
  bh.on_candidate_failed = [&](const std::string& why) { b2_failures.push_back(why); };
  bh.on_state = [&](LinkState s, const std::string&) { b2_states.push_back(s); };
  auto b2 = LinkSession::create(p.io, LinkSession::Role::bridge, p.bridge_secret, {}, bh);
  auto [b_end, a_end] = make_pipe(p.io);
  b2->attach_transport(std::move(b_end));
  p.agent->attach_transport(std::move(a_end));
  ASSERT_TRUE(run_until(
      p.io, [&] { return p.agent->state() == LinkState::closed && !b2_failures.empty(); }));
  EXPECT_NE(p.agent_states.back().second.find("bridge restarted"), std::string::npos)
      << p.agent_states.back().second;
  EXPECT_NE(b2_failures.back().find("bridge restarted"), std::string::npos) << b2_failures.back();
  EXPECT_EQ(b2->state(), LinkState::connecting);  // the new bridge is not harmed
  // The agent's owner starts a fresh agent session: the new bridge links up with it.
  p.agent2 = p.make_agent(p.agent_secret, {});
  auto [b_end2, a_end2] = make_pipe(p.io);
  b2->attach_transport(std::move(b_end2));
  p.agent2->attach_transport(std::move(a_end2));
  ASSERT_TRUE(run_until(p.io, [&] { return b2->state() == LinkState::up; }));
  ASSERT_EQ(b2_states.size(), 1u);
}

// On a ManualClock: the timeout is neither early nor missed, without waiting for it.
TEST(LinkSession, HandshakeTimesOut) {
  kb::ManualClock clock;  // declared first: outlives the sessions
  LinkSession::Options opts;
  opts.handshake_timeout = std::chrono::milliseconds(50);
  opts.clock = &clock;
  LinkPair p(opts);
  auto [silent, a_end] = make_pipe(p.io);
  p.agent->attach_transport(std::move(a_end));
  p.io.poll();
  clock.advance(std::chrono::milliseconds(49));
  p.io.poll();
  EXPECT_TRUE(p.agent_failures.empty()) << p.agent_failures[0];
  clock.advance(std::chrono::milliseconds(1));
  p.io.poll();  // no real waiting: on real time this would still be 50 ms away
  ASSERT_FALSE(p.agent_failures.empty());
  EXPECT_NE(p.agent_failures[0].find("timed out"), std::string::npos) << p.agent_failures[0];
}

TEST(LinkSession, CloseSendsGoodbyeAndClosesEveryStream) {
  LinkPair p;
  add_echo_kernels(p);
  p.connect_pipe();
  auto c = p.open_client(ChannelKind::shell, {}, {}, 1);
  ASSERT_TRUE(run_until(p.io, [&] { return p.agent->stats().streams == 1; }));
  p.agent->close("kernel job ended");
  ASSERT_TRUE(run_until(p.io, [&] { return p.bridge->state() == LinkState::closed; }));
  EXPECT_NE(p.bridge_states.back().second.find("kernel job ended"), std::string::npos);
  ASSERT_TRUE(run_until(p.io, [&] { return c->done || c->error_seen || c->failed; }));
  EXPECT_FALSE(p.bridge->send_control({{"type", "interrupt"}}));
}

// ---- bad input on a live link -----------------------------------------------------------------

// A hand-driven bridge: does a correct handshake with LinkHandshake, then sends whatever a test
// wants to the agent session under test.
struct ScriptedBridge {
  ScriptedBridge(LinkPair& p) : p(p) {
    auto [mine, theirs] = make_pipe(p.io, nullptr, 1 << 20, "scripted");
    end = std::move(mine);
    p.agent->attach_transport(std::move(theirs));
    SessionId self{};
    self.fill(7);
    auto nonce = auth::random_bytes(frame::kNonceSize);
    hs = std::make_unique<LinkHandshake>(LinkHandshake::Role::bridge, p.agent_secret.bytes, self,
                                         SessionId{}, 1 << 20, nonce);
    std::vector<std::uint8_t> out;
    hs->start(out);
    send(out);
    read();
  }
  void send(std::vector<std::uint8_t> bytes) {
    auto buf = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
    end->async_write(asio::buffer(*buf), [buf](error_code, std::size_t) {});
  }
  void read() {
    auto b = dec.prepare();
    end->async_read_some(asio::buffer(b.data(), b.size()), [this](error_code ec, std::size_t n) {
      if (ec) {
        transport_closed = true;
        return;
      }
      dec.commit(n);
      frame::DecodedFrame f;
      std::string err;
      while (dec.next(f, err) == frame::FrameDecoder::Status::frame) {
        if (hs->status() == LinkHandshake::Status::in_progress) {
          std::vector<std::uint8_t> out;
          if (hs->on_frame(f, out) == LinkHandshake::Status::authenticated) {
            frame::append_frame(out, frame::FrameType::resume, 0, 0, frame::u64_bytes(0));
          }
          send(out);
        } else if (f.header.type == frame::FrameType::resume) {
          resumed = true;
        }
      }
      read();
    });
  }
  void send_frame(frame::FrameType t, std::uint32_t stream, std::uint64_t seq,
                  std::vector<std::uint8_t> payload) {
    std::vector<std::uint8_t> out;
    frame::append_frame(out, t, stream, seq, payload);
    send(out);
  }
  LinkPair& p;
  ByteTransportPtr end;
  std::unique_ptr<LinkHandshake> hs;
  frame::FrameDecoder dec;
  bool resumed = false;
  bool transport_closed = false;
};

struct BadInputCase {
  const char* name;
  std::function<void(ScriptedBridge&)> inject;
  LinkState expected;
  const char* reason;
};

TEST(LinkSession, BadInputClosesTheTransportWithALoggedReason) {
  const std::vector<BadInputCase> cases = {
      {"garbage", [](ScriptedBridge& s) { s.send(std::vector<std::uint8_t>(40, 0xee)); },
       LinkState::down, "malformed frame"},
      {"oversized",
       [](ScriptedBridge& s) {
         std::vector<std::uint8_t> h(frame::kHeaderSize);
         frame::FrameHeader fh;
         fh.type = frame::FrameType::control;
         fh.length = 100'000'000;
         fh.seq = 1;
         frame::encode_header(fh, h.data());
         s.send(h);
       },
       LinkState::down, "exceeds the maximum"},
      {"out of order",
       [](ScriptedBridge& s) {
         s.send_frame(frame::FrameType::control, 0, 5, {'{', '}'});
       },
       LinkState::down, "out-of-order"},
      {"handshake frame on a live link",
       [](ScriptedBridge& s) {
         s.send_frame(frame::FrameType::resume, 0, 0, std::vector<std::uint8_t>(8));
       },
       LinkState::down, "unexpected RESUME"},
      {"ack beyond what was sent",
       [](ScriptedBridge& s) {
         auto a = frame::u64_bytes(1000);
         s.send_frame(frame::FrameType::ack, 0, 0, {a.begin(), a.end()});
       },
       LinkState::down, "outside the sent range"},
      {"unknown stream",
       [](ScriptedBridge& s) {
         s.send_frame(frame::FrameType::data, 9, 1, {1, 2, 3});
       },
       LinkState::closed, "unknown stream 9"},
      {"credit overflow",
       [](ScriptedBridge& s) {
         s.send_frame(frame::FrameType::open, 1, 1, {0});
         s.send_frame(frame::FrameType::credit, 1, 2, {0, 0x10, 0, 0});
       },
       LinkState::closed, "overflows the window"},
      {"data beyond the window",
       [](ScriptedBridge& s) {
         s.send_frame(frame::FrameType::open, 1, 1, {0});
         for (std::uint64_t i = 0; i < 6; ++i) {
           s.send_frame(frame::FrameType::data, 1, 2 + i, std::vector<std::uint8_t>(60'000, 1));
         }
       },
       LinkState::closed, "exceeded its credit"},
      {"stream id reused",
       [](ScriptedBridge& s) {
         s.send_frame(frame::FrameType::open, 3, 1, {0});
         s.send_frame(frame::FrameType::open, 3, 2, {0});
       },
       LinkState::closed, "ids must increase"},
  };
  for (const auto& tc : cases) {
    SCOPED_TRACE(tc.name);
    LinkSession::Options opts;
    opts.stream_window = 256 * 1024;
    LinkPair p(opts);
    p.hold_requests = true;
    ScriptedBridge s(p);
    ASSERT_TRUE(run_until(p.io, [&] { return s.resumed; }));
    ASSERT_EQ(p.agent->state(), LinkState::up);
    tc.inject(s);
    ASSERT_TRUE(
        run_until(p.io, [&] { return p.agent->state() == tc.expected && s.transport_closed; }))
        << "state " << to_string(p.agent->state());
    ASSERT_FALSE(p.agent_states.empty());
    EXPECT_NE(p.agent_states.back().second.find(tc.reason), std::string::npos)
        << p.agent_states.back().second;
  }
}

TEST(LinkSession, InvalidControlJsonIsReportedAndTheLinkStaysUp) {
  LinkPair p;
  ScriptedBridge s(p);
  ASSERT_TRUE(run_until(p.io, [&] { return s.resumed; }));
  s.send_frame(frame::FrameType::control, 0, 1, {'n', 'o', 't', ' ', 'j', 's', 'o', 'n'});
  s.send_frame(frame::FrameType::control, 0, 2, {'[', '1', ']'});
  const std::string ok = R"({"type":"interrupt"})";
  s.send_frame(frame::FrameType::control, 0, 3, {ok.begin(), ok.end()});
  ASSERT_TRUE(run_until(p.io, [&] { return !p.agent_controls.empty(); }));
  EXPECT_EQ(p.agent_controls.size(), 1u);
  EXPECT_EQ(p.agent_controls[0]["type"], "interrupt");
  EXPECT_EQ(p.agent->state(), LinkState::up);
}

}  // namespace
}  // namespace kb::tunnel

// ---- handover to the next bridge process (planned restart) --------------------------------------

namespace kb::tunnel {
namespace {

// A bridge process hands its session over mid-transfer: a new LinkSession made from the handover
// (the same descriptors, as the next process gets them) resumes with the same agent session and
// every client's bytes arrive exactly once, in order, both ways.
TEST(LinkSessionHandover, ResumesInANewSessionObjectWithNothingLostOrDuplicated) {
  LinkSession::Options opts;
  opts.max_chunk = 16 * 1024;
  LinkPair p(opts);
  add_echo_kernels(p);
  p.connect_pipe();
  for (int i = 0; i < 5; ++i) {
    auto data = pattern(4'000'000 + 7 * i, 700 + i);
    p.open_client(kKinds[i], data, data, 40 + i);
  }
  // Mid-transfer: a client has had part of its echo, none all of it.
  ASSERT_TRUE(run_until(p.io, [&] {
    for (auto& c : p.clients) {
      if (c->received >= 100'000) return true;
    }
    return false;
  }));
  for (auto& c : p.clients) ASSERT_FALSE(c->done || c->failed) << c->failure;
  std::optional<LinkHandover> handover;
  std::string why_not;
  bool answered = false;
  p.bridge->quiesce(std::chrono::seconds(10),
                    [&](std::optional<LinkHandover> h, const std::string& why) {
                      handover = std::move(h);
                      why_not = why;
                      answered = true;
                    });
  ASSERT_TRUE(run_until(p.io, [&] { return answered; }));
  ASSERT_TRUE(handover) << why_not;
  EXPECT_EQ(p.bridge->state(), LinkState::closed);
  EXPECT_EQ(handover->self_id, p.bridge->session_id());
  ASSERT_EQ(handover->streams.size(), 5u);
  for (const auto& st : handover->streams) EXPECT_GE(st.fd, 3);
  // Nothing more is delivered by the old process; the agent only sees its transport go.
  const auto received_before = p.clients[0]->received;
  ASSERT_TRUE(run_until(p.io, [&] { return p.agent->state() == LinkState::down; }));
  EXPECT_EQ(p.clients[0]->received, received_before);
  p.bridge.reset();

  std::vector<std::pair<LinkState, std::string>> states;
  LinkSession::Handlers bh;
  bh.on_state = [&](LinkState s, const std::string& why) { states.push_back({s, why}); };
  p.bridge = LinkSession::resume_handed_over(p.io, p.bridge_secret, opts, bh, *handover);
  EXPECT_EQ(p.bridge->state(), LinkState::down);
  EXPECT_EQ(p.bridge->session_id(), handover->self_id);
  p.connect_pipe();
  ASSERT_TRUE(run_until(
      p.io, [&] { return p.all_clients_done() || p.any_client_failed(); }, 120));
  ASSERT_TRUE(p.all_clients_done()) << p.client_failures();
  ASSERT_FALSE(states.empty());
  EXPECT_EQ(states.front().first, LinkState::up) << states.front().second;
  for (auto& [s, why] : p.agent_states) EXPECT_NE(s, LinkState::closed) << why;
  EXPECT_EQ(p.bridge->stats().resumes, 1u);
}

// Down with frames unacknowledged, a session cannot get quiet: no handover, a reason, and the
// session can still be closed normally.
TEST(LinkSessionHandover, QuiesceRefusesWhenTheAgentCannotAcknowledge) {
  LinkPair p;
  add_echo_kernels(p);
  auto data = pattern(1000, 1);
  p.open_client(ChannelKind::shell, data, data, 1);  // its OPEN waits for a transport
  std::optional<LinkHandover> handover;
  std::string why_not;
  bool answered = false;
  p.bridge->quiesce(std::chrono::milliseconds(100),
                    [&](std::optional<LinkHandover> h, const std::string& why) {
                      handover = std::move(h);
                      why_not = why;
                      answered = true;
                    });
  ASSERT_TRUE(run_until(p.io, [&] { return answered; }));
  EXPECT_FALSE(handover);
  EXPECT_NE(why_not.find("unacknowledged"), std::string::npos) << why_not;
  p.bridge->close("test over");
  EXPECT_EQ(p.bridge->state(), LinkState::closed);
}

TEST(LinkSessionHandover, AHandoverWithBadIdentitiesIsRefusedAndItsDescriptorsClosed) {
  asio::io_context io;
  LinkHandover h;
  h.self_id = "not hex";
  h.peer_id = std::string(32, 'a');
  h.peer_window = 65536;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  h.streams.push_back({1, ChannelKind::shell, 0, 0, false, false, false, fds[0]});
  EXPECT_THROW(LinkSession::resume_handed_over(io, auth::LinkSecret::generate(), {}, {}, h),
               std::invalid_argument);
  EXPECT_EQ(::fcntl(fds[0], F_GETFD), -1);  // closed
  ::close(fds[1]);
}

}  // namespace
}  // namespace kb::tunnel
