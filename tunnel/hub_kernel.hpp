#pragma once
// HubKernel: the hub-side end of one kernel. Five listeners (shell, iopub, stdin, control, hb) on
// the bind address that accept at once — each accepted client connection becomes a stream of the
// kernel's LinkSession, its bytes held until the link is up — and a link to the kernel's agent
// obtained from a transport provider (an SSH direct-tcpip channel, or plain TCP with --direct),
// asked for again with backoff + jitter whenever the link goes down. After the first link_up it
// sends start_kernel with the key from its ConnectionInfo; the agent's reports come back as typed
// HubEvents. An in-process API: the daemon (bridge/lifecycle_backend.cpp) and the `tunnel` command
// (cli/tunnel_commands.cpp, which owns the connection file and the JSON on stdout) drive it.
// Thread model: create, call and destroy it only on the thread that runs its io_context; every
// callback runs there.
#include "common/backoff.hpp"
#include "link/connection_file.hpp"
#include "link/session.hpp"
#include "link/transport.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>

namespace kb::tunnel {

// Thrown by HubKernel::listen at start-up (bad bind address, a listener cannot bind).
struct HubKernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What a HubKernel reports, in the order it happens. Secrets never appear in an event.
namespace hub_event {
// The five listeners accept; `ports` are the bound ones, indexed by ChannelKind.
struct Listening {
  std::array<std::uint16_t, kChannelKinds> ports{};
};
// A transport to the agent authenticated (first time or after a drop).
struct LinkUp {};
// The transport was lost; the kernel keeps its listeners and tries again.
struct LinkDown {
  std::string reason;
};
// The agent started the kernel (`restart`: a fresh one after restart()).
struct KernelStarted {
  int pid = 0;
  bool restart = false;
};
// The kernel process ended: by exit(code) or killed by a signal number (at most one is set).
struct KernelExited {
  std::optional<int> code;
  std::optional<int> signal;
};
// The agent is exiting (its job ends); the link closes after this.
struct AgentTerminating {
  std::string reason;
};
// Something a person should read (agent refused us, agent-side error, command on a closed link).
struct Error {
  std::string message;
};
// Final: listeners closed, link closed, no more events.
struct Closed {
  std::string reason;
};
}  // namespace hub_event

using HubEvent = std::variant<hub_event::Listening, hub_event::LinkUp, hub_event::LinkDown,
                              hub_event::KernelStarted, hub_event::KernelExited,
                              hub_event::AgentTerminating, hub_event::Error, hub_event::Closed>;

// A snapshot of one HubKernel's link (HubKernel::stats).
struct HubKernelStats {
  LinkState state = LinkState::connecting;  // LinkState::closed once the kernel is closed
  LinkSession::Stats link;                  // all zero before listen()
  std::uint64_t attempts = 0;               // transports asked of the provider
};

// Obtains a candidate transport to the agent. `permanent` in the result means retrying cannot help
// (host key refused, authentication denied): the kernel then stops trying and reports the error.
struct TransportResult {
  boost::system::error_code ec;
  std::string message;
  ByteTransportPtr transport;
  bool permanent = false;
};
using TransportProvider = std::function<void(std::function<void(TransportResult)>)>;

// What a HubKernel hands to the process that replaces it (planned restart): its five listening
// sockets (indexed by ChannelKind) and its link session with every client connection. The
// descriptors belong to whoever holds this.
struct HubHandover {
  std::array<int, kChannelKinds> listeners{-1, -1, -1, -1, -1};
  LinkHandover link;
};

// A transport provider that connects over plain TCP to host:port (used with --direct).
TransportProvider make_direct_provider(
    boost::asio::io_context& io, std::string host, std::uint16_t port,
    std::chrono::milliseconds timeout = std::chrono::seconds(10));

class HubKernel : public std::enable_shared_from_this<HubKernel> {
 public:
  struct Options {
    int index = 0;  // "kernel <index>" in errors, "k<index>" in logs
    // The hub-side endpoints and the Jupyter key sent to the agent in start_kernel. A port 0 is
    // chosen by listen(). Never logged.
    ConnectionInfo connection;
    std::string bind_address = "127.0.0.1";
    std::string agent;  // "host:port", for logs and events
    kb::auth::LinkSecret secret;
    LinkSession::Options link;
    std::chrono::milliseconds backoff_min{250}, backoff_max{10000};
    // How long a shutdown waits for the agent to confirm (kernel killed, link closed).
    std::chrono::milliseconds shutdown_timeout{15000};
  };
  using EventSink = std::function<void(const HubEvent&)>;

  static std::shared_ptr<HubKernel> create(boost::asio::io_context& io, Options options,
                                           TransportProvider provider, EventSink events);
  ~HubKernel();
  HubKernel(const HubKernel&) = delete;
  HubKernel& operator=(const HubKernel&) = delete;

  // Binds the five listeners (throws HubKernelError naming the port) and returns the connection
  // info with the bound ports (chosen ones where 0 was given), so a caller that keeps a
  // connection file can rewrite it before anyone is told the kernel listens. Call once.
  const ConnectionInfo& listen();
  // Instead of listen(): take the listeners and the link session a previous process handed over
  // (the kernel runs; no start_kernel is sent). The ports are the listeners'. Throws
  // HubKernelError for descriptors that are not listening TCP sockets (they are closed).
  const ConnectionInfo& adopt(const HubHandover& handover);
  // After listen() or adopt(): reports Listening, starts accepting and asks the provider for the
  // first transport.
  void start();
  // For a planned restart: stop accepting (new connections wait in the listen backlog for the
  // next process), quiesce the link (LinkSession::quiesce) and hand everything over. On success
  // this kernel is closed without a word to the agent and without a Closed event; on failure
  // (`why_not`) it stops accepting but is otherwise untouched, for close().
  void quiesce(std::chrono::milliseconds timeout,
               std::function<void(std::optional<HubHandover>, const std::string& why_not)> done);

  // Commands to the agent (reliable: queued while the link is down).
  void interrupt();
  void restart();
  // Asks the agent to shut down (it kills the kernel and exits); `done` runs once the link is
  // closed (or after shutdown_timeout, or at once if the link never came up). Idempotent.
  void shutdown(std::function<void()> done);
  // Closes everything now, without asking the agent.
  void close(const std::string& reason);

  bool closed() const { return closed_; }
  // A permanent failure (e.g. host key refused) happened; the kernel is not being retried.
  bool failed_permanently() const { return failed_permanently_; }
  HubKernelStats stats() const;

 private:
  HubKernel(boost::asio::io_context& io, Options options, TransportProvider provider,
            EventSink events);
  void emit(const HubEvent& event);
  LinkSession::Handlers link_handlers();
  LinkSession::Options link_options() const;
  void accept_next(std::size_t kind);
  void request_transport();
  void schedule_retry(const std::string& why);
  void on_link_state(LinkState state, const std::string& reason);
  void on_control(const nlohmann::json& message);
  void finish_shutdown();

  boost::asio::io_context& io_;
  Options options_;
  TransportProvider provider_;
  EventSink events_;
  std::string log_id_;
  std::array<std::optional<boost::asio::ip::tcp::acceptor>, kChannelKinds> acceptors_;
  std::array<std::unique_ptr<boost::asio::steady_timer>, kChannelKinds> accept_retry_;
  std::shared_ptr<LinkSession> session_;
  boost::asio::steady_timer retry_timer_;
  boost::asio::steady_timer stable_timer_;
  boost::asio::steady_timer shutdown_timer_;
  kb::Backoff backoff_;  // no steps taken: the link was stable, the next drop retries at once
  bool attempt_in_flight_ = false;
  bool retry_scheduled_ = false;
  bool start_sent_ = false;
  bool closed_ = false;
  bool failed_permanently_ = false;
  bool agent_terminating_ = false;
  bool shutting_down_ = false;
  bool quiescing_ = false;
  std::function<void()> shutdown_done_;
  std::uint64_t attempts_ = 0;
};

}  // namespace kb::tunnel
