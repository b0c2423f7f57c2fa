#pragma once
// Agent: the compute-node end of a kernel's link (`kernel-bridge agent`). Listens for the bridge on
// the compute node's network, authenticates it through the LinkSession, starts the kernel (bound to
// 127.0.0.1) with the key the bridge sends, relays each stream the bridge opens to the kernel's
// port of that kind, reports kernel start/exit and its own end, and exits when told to, when the
// batch system sends SIGTERM, or when no bridge has been authenticated for too long.
// Thread model: construct, start and destroy on the thread that runs the io_context; everything
// (link handlers, signal handlers, the kernel's exit) runs on that thread.
#include "agent/kernel_process.hpp"
#include "link/connection_file.hpp"
#include "link/session.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace kb::tunnel {

// Exit statuses of `kernel-bridge agent` (docs/agent.md).
inline constexpr int kAgentExitShutdown = 0;  // the bridge asked for shutdown
inline constexpr int kAgentExitUsage = 2;     // bad options, secret, address, directories
inline constexpr int kAgentExitNoBridge = 3;  // no authenticated bridge within the timeout
// 128 + N: ended by signal N (SIGTERM from the batch system: 143), after cleaning up.

// Thrown at start-up only; the message says what is wrong and what to do.
struct AgentError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct AgentOptions {
  std::string listen_host;        // address (or name) on the compute node's network
  std::uint16_t listen_port = 0;  // 0: ephemeral
  std::string secret_file;        // LinkSecret file (0600)
  std::string discovery_file = "kernel-bridge-agent.json";
  std::string runtime_dir;                              // empty: $TMPDIR, else /tmp
  std::chrono::milliseconds no_bridge_timeout{600000};  // 0: never
  std::chrono::milliseconds kernel_grace{5000};
  std::vector<std::string> kernel_argv;  // "{connection_file}" is substituted
  LinkSession::Options link;
  // How long a stream opened by the bridge waits for the kernel to accept on its port: while no
  // kernel has been started yet, and after the kernel started (it binds its ports only once its
  // interpreter has loaded, seconds later on a busy node).
  std::chrono::milliseconds stream_wait{120000};
};

// "ADDR", "ADDR:PORT", "[V6ADDR]:PORT" → host and port (0 when omitted). Throws AgentError.
void parse_listen_address(const std::string& text, std::string& host, std::uint16_t& port);

class Agent {
 public:
  // Reads the secret, creates the private runtime directory; throws AgentError.
  Agent(boost::asio::io_context& io, AgentOptions options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Binds the listener, writes the discovery file, starts accepting and the no-bridge clock.
  // Throws AgentError. Once the agent has finished it stops the io_context.
  void start();
  // Set once the agent has finished (the io_context is stopped shortly after).
  std::optional<int> exit_code() const { return exit_code_; }
  std::uint16_t port() const { return port_; }
  const std::string& connection_file() const { return connection_file_; }

 private:
  struct PendingStream;
  enum class KernelState { none, running, stopping, exited };

  void make_session();
  void accept_next();
  void on_control(const nlohmann::json& message);
  void on_link_state(LinkState state, const std::string& reason);
  void on_stream_request(std::uint32_t id, ChannelKind kind);
  void try_connect(std::uint32_t id);
  void retry_later(std::uint32_t id);
  void refuse(std::uint32_t id, const std::string& reason);
  void refuse_all_pending(const std::string& reason);

  void handle_start(const nlohmann::json& message);
  void handle_restart();
  void handle_interrupt();
  void start_kernel(bool restart);
  void on_kernel_exit(const ProcessExit& exit);
  void send(const nlohmann::json& message);
  void send_error(const std::string& message);

  void arm_no_bridge_timer();
  void on_signal(int signal);
  // Ends the agent: kills the kernel if needed, then finish(code).
  void stop_and_exit(int code, const std::string& why);
  void finish(int code);
  void close_when_flushed(std::chrono::steady_clock::time_point deadline);
  void remove_runtime_files();

  boost::asio::io_context& io_;
  AgentOptions options_;
  std::string log_id_;
  std::optional<kb::auth::LinkSecret> secret_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::uint16_t port_ = 0;
  boost::asio::steady_timer accept_retry_;
  std::shared_ptr<LinkSession> session_;
  bool closing_session_ = false;

  std::string runtime_subdir_;
  std::string connection_file_;
  ConnectionInfo info_;
  PortReservation ports_held_;  // the running kernel's ports, held until it exits
  bool have_key_ = false;
  KernelProcess kernel_;
  KernelState kernel_state_ = KernelState::none;
  bool restart_pending_ = false;
  std::chrono::steady_clock::time_point kernel_started_at_;
  std::uint64_t kernel_generation_ = 0;

  std::map<std::uint32_t, std::unique_ptr<PendingStream>> pending_;

  boost::asio::steady_timer no_bridge_timer_;
  boost::asio::signal_set signals_;
  std::optional<int> exiting_code_;  // set once the agent is on its way out
  std::optional<int> exit_code_;
  boost::asio::steady_timer exit_timer_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// The whole `kernel-bridge agent` process: one io_context on this thread; returns the exit status.
int run_agent(AgentOptions options);

}  // namespace kb::tunnel
