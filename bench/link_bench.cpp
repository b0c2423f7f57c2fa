// link_bench: what the link itself costs, on loopback, without SSH. Three threads, three
// io_contexts: the bridge (LinkSession + client listener), the agent (LinkSession + "kernel"
// servers), and a blocking client. The link runs over a loopback TCP connection.
//   round trip: 64-byte request/echo, direct to the kernel vs. through bridge+link+agent;
//   throughput: one stream's bulk transfer client -> kernel (sink), direct vs. through the link.
// Usage: link_bench [--rounds N] [--megabytes M] [--chunk BYTES]. Prints a table, then one JSON
// line.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "link/session.hpp"
#include "link/tcp_transport.hpp"

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;
using namespace kb::tunnel;

namespace {

const auto kLoopback = asio::ip::make_address("127.0.0.1");

// Kernel side: shell = echo, iopub = sink (reads to EOF, then answers one byte).
class Kernels {
 public:
  explicit Kernels(asio::io_context& io) : echo_(io, {kLoopback, 0}), sink_(io, {kLoopback, 0}) {
    accept(echo_, true);
    accept(sink_, false);
  }
  tcp::endpoint echo() const { return echo_.local_endpoint(); }
  tcp::endpoint sink() const { return sink_.local_endpoint(); }

 private:
  struct Conn {
    explicit Conn(tcp::socket s) : socket(std::move(s)) {}
    tcp::socket socket;
    std::vector<char> buf = std::vector<char>(256 * 1024);
  };
  void accept(tcp::acceptor& a, bool echo) {
    a.async_accept([this, &a, echo](error_code ec, tcp::socket s) {
      if (ec) return;
      s.set_option(tcp::no_delay(true));
      auto c = std::make_shared<Conn>(std::move(s));
      echo ? run_echo(c) : run_sink(c);
      accept(a, echo);
    });
  }
  static void run_echo(std::shared_ptr<Conn> c) {
    c->socket.async_read_some(asio::buffer(c->buf), [c](error_code ec, std::size_t n) {
      if (ec) return;
      asio::async_write(c->socket, asio::buffer(c->buf.data(), n), [c](error_code ec, std::size_t) {
        if (!ec) run_echo(c);
      });
    });
  }
  static void run_sink(std::shared_ptr<Conn> c) {
    c->socket.async_read_some(asio::buffer(c->buf), [c](error_code ec, std::size_t) {
      if (ec == asio::error::eof) {
        asio::async_write(c->socket, asio::buffer("k", 1), [c](error_code, std::size_t) {});
        return;
      }
      if (!ec) run_sink(c);
    });
  }
  tcp::acceptor echo_, sink_;
};

std::vector<double> round_trips(const tcp::endpoint& ep, int rounds) {
  asio::io_context io;
  tcp::socket s(io);
  s.connect(ep);
  s.set_option(tcp::no_delay(true));
  char msg[64];
  std::memset(msg, 'x', sizeof msg);
  char reply[64];
  std::vector<double> us;
  us.reserve(rounds);
  for (int i = -100; i < rounds; ++i) {  // 100 warm-up rounds
    const auto t0 = Clock::now();
    asio::write(s, asio::buffer(msg));
    asio::read(s, asio::buffer(reply));
    const auto t1 = Clock::now();
    if (i >= 0) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(us.begin(), us.end());
  return us;
}

double throughput_mbps(const tcp::endpoint& ep, std::size_t megabytes) {
  asio::io_context io;
  tcp::socket s(io);
  s.connect(ep);
  s.set_option(tcp::no_delay(true));
  std::vector<char> chunk(256 * 1024, 'y');
  const auto t0 = Clock::now();
  std::size_t sent = 0;
  while (sent < megabytes * 1024 * 1024) sent += asio::write(s, asio::buffer(chunk));
  s.shutdown(tcp::socket::shutdown_send);
  char k;
  asio::read(s, asio::buffer(&k, 1));  // the sink has everything
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  return static_cast<double>(sent) * 8 / secs / 1e6;
}

double pct(const std::vector<double>& v, double p) {
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 20000;
  std::size_t megabytes = 512;
  LinkSession::Options options;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--rounds") rounds = std::stoi(argv[i + 1]);
    if (std::string(argv[i]) == "--megabytes") megabytes = std::stoul(argv[i + 1]);
    if (std::string(argv[i]) == "--chunk") options.max_chunk = std::stoul(argv[i + 1]);
  }
  spdlog::set_level(spdlog::level::warn);
  const auto secret = kb::auth::LinkSecret::generate();

  // Agent thread: kernels + agent session + listener for the bridge.
  asio::io_context agent_io;
  Kernels kernels(agent_io);
  tcp::acceptor link_listener(agent_io, {kLoopback, 0});
  std::shared_ptr<LinkSession> agent;
  LinkSession::Handlers ah;
  ah.on_stream_request = [&](std::uint32_t id, ChannelKind kind) {
    auto sock = std::make_shared<tcp::socket>(agent_io);
    sock->async_connect(kind == ChannelKind::iopub ? kernels.sink() : kernels.echo(),
                        [&, sock, id](error_code ec) {
                          if (ec) return agent->refuse_stream(id, ec.message());
                          agent->attach_stream(id, std::move(*sock));
                        });
  };
  agent = LinkSession::create(agent_io, LinkSession::Role::agent, secret, options, ah);
  link_listener.async_accept([&](error_code ec, tcp::socket s) {
    if (!ec) agent->attach_transport(make_tcp_transport(std::move(s)));
  });

  // Bridge thread: bridge session + client listeners (shell and iopub).
  asio::io_context bridge_io;
  std::promise<void> up;
  LinkSession::Handlers bh;
  bool signalled = false;
  bh.on_state = [&](LinkState s, const std::string&) {
    if (s == LinkState::up && !signalled) {
      signalled = true;
      up.set_value();
    }
  };
  auto bridge = LinkSession::create(bridge_io, LinkSession::Role::bridge, secret, options, bh);
  tcp::acceptor shell_listener(bridge_io, {kLoopback, 0}),
      iopub_listener(bridge_io, {kLoopback, 0});
  std::function<void(tcp::acceptor&, ChannelKind)> accept = [&](tcp::acceptor& a, ChannelKind k) {
    a.async_accept([&, k](error_code ec, tcp::socket s) {
      if (ec) return;
      bridge->add_local_stream(k, std::move(s));
      accept(a, k);
    });
  };
  accept(shell_listener, ChannelKind::shell);
  accept(iopub_listener, ChannelKind::iopub);
  tcp::socket to_agent(bridge_io);
  to_agent.connect(link_listener.local_endpoint());
  bridge->attach_transport(make_tcp_transport(std::move(to_agent)));

  // Both loops always have work pending (session timers, acceptors); they end with stop().
  std::thread agent_thread([&] { agent_io.run(); });
  std::thread bridge_thread([&] { bridge_io.run(); });
  up.get_future().wait();

  const auto direct = round_trips(kernels.echo(), rounds);
  const auto linked = round_trips(shell_listener.local_endpoint(), rounds);
  const double thr_direct = throughput_mbps(kernels.sink(), megabytes);
  const double thr_link = throughput_mbps(iopub_listener.local_endpoint(), megabytes);

  std::printf("%-28s %12s %12s\n", "", "direct", "via link");
  std::printf("%-28s %12.1f %12.1f\n", "round trip p50 (us)", pct(direct, 0.5), pct(linked, 0.5));
  std::printf("%-28s %12.1f %12.1f\n", "round trip p99 (us)", pct(direct, 0.99), pct(linked, 0.99));
  std::printf("%-28s %12.0f %12.0f\n", "throughput (Mbit/s)", thr_direct, thr_link);
  std::printf(
      "{\"rtt_p50_us_direct\": %.1f, \"rtt_p50_us_link\": %.1f, \"rtt_p99_us_link\": %.1f, "
      "\"thr_mbps_direct\": %.0f, \"thr_mbps_link\": %.0f, \"rounds\": %d, \"megabytes\": %zu, "
      "\"max_chunk\": %zu}\n",
      pct(direct, 0.5), pct(linked, 0.5), pct(linked, 0.99), thr_direct, thr_link, rounds,
      megabytes, options.max_chunk);

  asio::post(bridge_io, [&] {
    bridge->close("benchmark done");
    bridge_io.stop();
  });
  bridge_thread.join();
  asio::post(agent_io, [&] { agent_io.stop(); });
  agent_thread.join();
  return 0;
}
