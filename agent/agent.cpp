#include "agent/agent.hpp"

#include "link/tcp_transport.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace kb::tunnel {

namespace fs = std::filesystem;
namespace asio = boost::asio;
using boost::system::error_code;

struct Agent::PendingStream {
  ChannelKind kind;
  std::chrono::steady_clock::time_point requested_at;
  std::chrono::milliseconds delay{20};
  asio::ip::tcp::socket socket;
  asio::steady_timer timer;
  PendingStream(asio::io_context& io, ChannelKind k)
      : kind(k), requested_at(std::chrono::steady_clock::now()), socket(io), timer(io) {}
};

namespace {

std::string local_hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "unknown";
  return name;
}

std::string substitute(const std::string& arg, const std::string& connection_file) {
  static const std::string placeholder = "{connection_file}";
  std::string out = arg;
  for (auto pos = out.find(placeholder); pos != std::string::npos;
       pos = out.find(placeholder, pos + connection_file.size())) {
    out.replace(pos, placeholder.size(), connection_file);
  }
  return out;
}

}  // namespace

void parse_listen_address(const std::string& text, std::string& host, std::uint16_t& port) {
  port = 0;
  std::string port_text;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string::npos) {
      throw AgentError("--listen " + text + ": missing ']' after the IPv6 address");
    }
    host = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') throw AgentError("--listen " + text + ": expected ':' after ']'");
      port_text = text.substr(close + 2);
    }
  } else {
    auto colon = text.find(':');
    if (colon != std::string::npos && text.find(':', colon + 1) != std::string::npos) {
      host = text;  // a bare IPv6 address without a port
    } else if (colon != std::string::npos) {
      host = text.substr(0, colon);
      port_text = text.substr(colon + 1);
    } else {
      host = text;
    }
  }
  if (host.empty()) throw AgentError("--listen " + text + ": no address given");
  if (!port_text.empty()) {
    char* end = nullptr;
    long value = std::strtol(port_text.c_str(), &end, 10);
    if (*end != '\0' || value < 0 || value > 65535) {
      throw AgentError("--listen " + text + ": '" + port_text + "' is not a port (0-65535)");
    }
    port = static_cast<std::uint16_t>(value);
  }
}

Agent::Agent(asio::io_context& io, AgentOptions options)
    : io_(io),
      options_(std::move(options)),
      log_id_("agent"),
      acceptor_(io),
      accept_retry_(io),
      kernel_(io, "agent"),
      no_bridge_timer_(io),
      signals_(io),
      exit_timer_(io) {
  if (options_.kernel_argv.empty()) {
    throw AgentError(
        "no kernel command given: put it after '--', e.g. -- /usr/bin/python3 -m "
        "ipykernel_launcher -f {connection_file}");
  }
  try {
    secret_ = kb::auth::LinkSecret::read_file(options_.secret_file);
  } catch (const kb::auth::SecretError& e) {
    throw AgentError(e.what());
  }
  std::string base = options_.runtime_dir;
  if (base.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    base = tmp && *tmp ? tmp : "/tmp";
  }
  std::error_code fec;
  if (!fs::exists(base, fec)) {
    fs::create_directories(base, fec);
    if (fec) {
      throw AgentError("cannot create runtime directory " + base + ": " + fec.message() +
                       " (give a writable node-local directory with --runtime-dir)");
    }
    ::chmod(base.c_str(), 0700);
  }
  // A private directory per agent: the connection file holds the kernel's key.
  std::string tmpl = (fs::path(base) / "kernel-bridge-agent-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) {
    throw AgentError("cannot create a private directory in " + base + ": " + std::strerror(errno) +
                     " (give a writable node-local directory with "
                     "--runtime-dir)");
  }
  runtime_subdir_ = tmpl;
  connection_file_ = (fs::path(runtime_subdir_) / "kernel-connection.json").string();
  info_.ip = "127.0.0.1";
  info_.transport = "tcp";
}

Agent::~Agent() {
  *alive_ = false;
  if (session_) session_->close("agent stopped");
  remove_runtime_files();
}

void Agent::start() {
  std::string host = options_.listen_host;
  asio::ip::tcp::endpoint endpoint;
  error_code ec;
  auto address = asio::ip::make_address(host, ec);
  if (ec) {
    // A name: resolved once at start-up (the loop is not running yet).
    asio::ip::tcp::resolver resolver(io_);
    auto results = resolver.resolve(host, std::to_string(options_.listen_port), ec);
    if (ec || results.empty()) {
      throw AgentError("--listen: cannot resolve '" + host +
                       "': " + (ec ? ec.message() : std::string("no address")));
    }
    endpoint = results.begin()->endpoint();
  } else {
    endpoint = asio::ip::tcp::endpoint(address, options_.listen_port);
  }
  acceptor_.open(endpoint.protocol(), ec);
  if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(endpoint, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    throw AgentError("cannot listen on " + endpoint.address().to_string() + ":" +
                     std::to_string(endpoint.port()) + ": " + ec.message() +
                     " (is the address one of this node's? is the port free?)");
  }
  ::fcntl(acceptor_.native_handle(), F_SETFD, FD_CLOEXEC);
  port_ = acceptor_.local_endpoint().port();

  // The discovery file tells the bridge where to knock. A wildcard address is useless to it, so
  // then the host name stands in.
  std::string advertised =
      endpoint.address().is_unspecified() ? local_hostname() : endpoint.address().to_string();
  nlohmann::json discovery = {{"host", advertised},
                              {"port", port_},
                              {"pid", ::getpid()},
                              {"hostname", local_hostname()},
                              {"version", KB_VERSION}};
  try {
    write_file_atomic(options_.discovery_file, discovery.dump() + "\n", 0644);
  } catch (const ConnectionFileError& e) {
    throw AgentError(std::string("cannot write the discovery file: ") + e.what() +
                     " (check --discovery-file)");
  }
  spdlog::info("[{}] listening for the bridge on {}:{} (discovery file {}); kernel runtime dir {}",
               log_id_, endpoint.address().to_string(), port_, options_.discovery_file,
               runtime_subdir_);

  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.add(SIGHUP);
  std::weak_ptr<bool> alive = alive_;
  signals_.async_wait([this, alive](const error_code& e, int sig) {
    if (!alive.expired() && !e) on_signal(sig);
  });
  make_session();
  arm_no_bridge_timer();
  accept_next();
}

void Agent::make_session() {
  LinkSession::Handlers handlers;
  std::weak_ptr<bool> alive = alive_;
  handlers.on_control = [this, alive](const nlohmann::json& m) {
    if (!alive.expired()) on_control(m);
  };
  handlers.on_state = [this, alive](LinkState s, const std::string& reason) {
    if (!alive.expired()) on_link_state(s, reason);
  };
  handlers.on_stream_request = [this, alive](std::uint32_t id, ChannelKind kind) {
    if (!alive.expired()) on_stream_request(id, kind);
  };
  handlers.on_candidate_failed = [this, alive](const std::string& reason) {
    if (alive.expired()) return;
    spdlog::warn("[{}] refused a connecting bridge (authentication failed or incomplete): {}",
                 log_id_, reason);
  };
  auto options = options_.link;
  if (options.log_id.empty()) options.log_id = log_id_;
  closing_session_ = false;
  session_ =
      LinkSession::create(io_, LinkSession::Role::agent, *secret_, options, std::move(handlers));
}

void Agent::accept_next() {
  std::weak_ptr<bool> alive = alive_;
  acceptor_.async_accept([this, alive](const error_code& ec, asio::ip::tcp::socket socket) {
    if (alive.expired() || ec == asio::error::operation_aborted || exit_code_) return;
    if (ec) {
      // Out of descriptors (or a transient error): back off instead of spinning.
      bool exhausted = ec == asio::error::no_descriptors || ec.value() == ENFILE;
      spdlog::warn("[{}] accept failed: {}; retrying in {} ms", log_id_, ec.message(),
                   exhausted ? 1000 : 100);
      accept_retry_.expires_after(std::chrono::milliseconds(exhausted ? 1000 : 100));
      accept_retry_.async_wait([this, alive](const error_code& e) {
        if (!alive.expired() && !e && !exit_code_) accept_next();
      });
      return;
    }
    error_code rec;
    auto peer = socket.remote_endpoint(rec);
    ::fcntl(socket.native_handle(), F_SETFD, FD_CLOEXEC);
    spdlog::info("[{}] connection from {}:{}: authenticating", log_id_,
                 rec ? "?" : peer.address().to_string(), rec ? 0 : peer.port());
    if (session_ && !exiting_code_)
      session_->attach_transport(make_tcp_transport(std::move(socket)));
    accept_next();
  });
}

void Agent::on_link_state(LinkState state, const std::string& reason) {
  switch (state) {
    case LinkState::up:
      spdlog::info("[{}] bridge authenticated: link up", log_id_);
      no_bridge_timer_.cancel();
      break;
    case LinkState::down:
      spdlog::warn("[{}] link down ({}): waiting for the bridge to reconnect", log_id_, reason);
      arm_no_bridge_timer();
      break;
    case LinkState::connecting:
      break;
    case LinkState::closed:
      spdlog::info("[{}] link closed: {}", log_id_, reason);
      if (closing_session_ || exiting_code_) break;
      // The bridge ended this session (e.g. the bridge service restarted). The kernel keeps
      // running; a fresh session waits for the next bridge, under the no-bridge clock.
      {
        std::weak_ptr<bool> alive = alive_;
        asio::post(io_, [this, alive] {
          if (alive.expired() || exiting_code_) return;
          refuse_all_pending("link closed");
          pending_.clear();
          make_session();
          arm_no_bridge_timer();
        });
      }
      break;
  }
}

void Agent::arm_no_bridge_timer() {
  if (options_.no_bridge_timeout.count() == 0 || exiting_code_) return;
  std::weak_ptr<bool> alive = alive_;
  no_bridge_timer_.expires_after(options_.no_bridge_timeout);
  no_bridge_timer_.async_wait([this, alive](const error_code& ec) {
    if (alive.expired() || ec) return;
    if (session_ && session_->state() == LinkState::up) return;
    spdlog::error(
        "[{}] no authenticated bridge for {:.3g} s (--no-bridge-timeout): stopping the "
        "kernel and exiting, so an orphaned job does not burn compute hours",
        log_id_, options_.no_bridge_timeout.count() / 1000.0);
    stop_and_exit(kAgentExitNoBridge, "no bridge");
  });
}

void Agent::on_signal(int sig) {
  std::string name = ProcessExit::signal_name(sig);
  if (exiting_code_) {
    spdlog::warn("[{}] {} received while already exiting", log_id_, name);
  } else {
    std::string reason =
        sig == SIGTERM ? "SIGTERM received (allocation ending)" : name + " received";
    spdlog::warn("[{}] {}: stopping the kernel and exiting", log_id_, reason);
    send({{"type", "agent_terminating"}, {"reason", reason}});
    stop_and_exit(128 + sig, reason);
  }
  std::weak_ptr<bool> alive = alive_;
  signals_.async_wait([this, alive](const error_code& e, int s) {
    if (!alive.expired() && !e) on_signal(s);
  });
}

void Agent::on_control(const nlohmann::json& message) {
  if (!message.is_object() || !message.contains("type") || !message["type"].is_string()) {
    send_error("control message without a \"type\" string ignored");
    return;
  }
  const std::string type = message["type"].get<std::string>();
  if (exiting_code_) {
    spdlog::info("[{}] '{}' ignored: the agent is exiting", log_id_, type);
    return;
  }
  if (type == "start_kernel") {
    handle_start(message);
  } else if (type == "interrupt") {
    handle_interrupt();
  } else if (type == "restart_kernel") {
    handle_restart();
  } else if (type == "shutdown") {
    spdlog::info("[{}] shutdown requested by the bridge", log_id_);
    stop_and_exit(kAgentExitShutdown, "shutdown requested");
  } else {
    send_error("unknown control message type '" + type + "'");
  }
}

void Agent::handle_start(const nlohmann::json& m) {
  auto key = m.find("key");
  if (key == m.end() || !key->is_string()) {
    send_error("start_kernel without a \"key\" string: the kernel was not started");
    return;
  }
  std::string scheme = m.value("signature_scheme", std::string("hmac-sha256"));
  std::string name = m.value("kernel_name", std::string());
  if (kernel_state_ == KernelState::running || kernel_state_ == KernelState::stopping) {
    if (key->get<std::string>() != info_.key) {
      send_error(
          "start_kernel: a kernel is already running with another key; send "
          "restart_kernel or shutdown first");
      return;
    }
    // A bridge that reconnected with a fresh session asks again: tell it what runs.
    spdlog::info("[{}] start_kernel: kernel pid {} already running", log_id_, kernel_.pid());
    if (kernel_state_ == KernelState::running) {
      send({{"type", "kernel_started"}, {"pid", kernel_.pid()}, {"restart", false}});
    }
    return;
  }
  // Validate through the same rules as a connection file (the scheme must be hmac-<digest>).
  nlohmann::json probe = info_.to_json();
  probe["key"] = *key;
  probe["signature_scheme"] = scheme;
  probe["kernel_name"] = name;
  try {
    ConnectionInfo checked =
        parse_connection_info(probe, "start_kernel", ParseOptions{.allow_zero_ports = true});
    info_.key = checked.key;
    info_.signature_scheme = checked.signature_scheme;
    info_.kernel_name = checked.kernel_name;
  } catch (const ConnectionFileError& e) {
    send_error(e.what());
    return;
  }
  have_key_ = true;
  start_kernel(false);
}

void Agent::handle_interrupt() {
  if (kernel_state_ != KernelState::running || !kernel_.interrupt()) {
    send_error("interrupt: no kernel is running");
  }
}

void Agent::handle_restart() {
  if (!have_key_) {
    send_error("restart_kernel: no kernel was started yet (send start_kernel first)");
    return;
  }
  spdlog::info("[{}] restart requested by the bridge", log_id_);
  if (kernel_state_ == KernelState::running || kernel_state_ == KernelState::stopping) {
    restart_pending_ = true;
    kernel_state_ = KernelState::stopping;
    kernel_.terminate(options_.kernel_grace);
    return;
  }
  start_kernel(true);
}

void Agent::start_kernel(bool restart) {
  std::string error;
  try {
    ports_held_ = PortReservation::reserve();
    info_.ports = ports_held_.ports();
    write_connection_file(connection_file_, info_);
  } catch (const ConnectionFileError& e) {
    error = e.what();
  }
  std::vector<std::string> argv;
  for (const auto& a : options_.kernel_argv) argv.push_back(substitute(a, connection_file_));
  std::weak_ptr<bool> alive = alive_;
  if (error.empty() && kernel_.start(
                           argv,
                           [this, alive](const ProcessExit& e) {
                             if (!alive.expired()) on_kernel_exit(e);
                           },
                           error)) {
    kernel_state_ = KernelState::running;
    kernel_started_at_ = std::chrono::steady_clock::now();
    ++kernel_generation_;
    spdlog::info(
        "[{}] kernel started: pid {}{}; connection file {} (ports shell {} iopub {} "
        "stdin {} control {} hb {} on 127.0.0.1)",
        log_id_, kernel_.pid(), restart ? " (restart)" : "", connection_file_,
        info_.port(ChannelKind::shell), info_.port(ChannelKind::iopub),
        info_.port(ChannelKind::stdin_), info_.port(ChannelKind::control),
        info_.port(ChannelKind::hb));
    send({{"type", "kernel_started"}, {"pid", kernel_.pid()}, {"restart", restart}});
    // Streams waiting for a kernel try at once.
    for (auto& [id, p] : pending_) {
      p->delay = std::chrono::milliseconds(20);
      p->timer.cancel();
    }
    return;
  }
  kernel_state_ = KernelState::exited;
  ports_held_.release();
  spdlog::error("[{}] cannot start the kernel: {}", log_id_, error);
  send_error("cannot start the kernel: " + error);
  refuse_all_pending("the kernel could not be started: " + error);
}

void Agent::on_kernel_exit(const ProcessExit& exit) {
  nlohmann::json event = {{"type", "kernel_exited"}, {"code", nullptr}, {"signal", nullptr}};
  if (exit.code) event["code"] = *exit.code;
  if (exit.signal) event["signal"] = ProcessExit::signal_name(*exit.signal);
  send(event);
  kernel_state_ = KernelState::exited;
  ports_held_.release();
  if (exiting_code_) {
    finish(*exiting_code_);
    return;
  }
  if (restart_pending_) {
    restart_pending_ = false;
    start_kernel(true);
    return;
  }
  spdlog::warn("[{}] kernel exited on its own ({}); waiting for restart_kernel or shutdown",
               log_id_, exit.describe());
  refuse_all_pending("the kernel exited (" + exit.describe() + ")");
}

void Agent::on_stream_request(std::uint32_t id, ChannelKind kind) {
  if (exiting_code_) {
    session_->refuse_stream(id, "the agent is exiting");
    return;
  }
  auto [it, inserted] = pending_.emplace(id, std::make_unique<PendingStream>(io_, kind));
  if (!inserted) {
    spdlog::warn("[{}] stream {} requested twice; ignored", log_id_, id);
    return;
  }
  try_connect(id);
}

void Agent::try_connect(std::uint32_t id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  PendingStream& p = *it->second;
  auto now = std::chrono::steady_clock::now();
  if (kernel_state_ != KernelState::running) {
    bool waiting_for_start = kernel_state_ == KernelState::none || restart_pending_ ||
                             kernel_state_ == KernelState::stopping;
    if (waiting_for_start && now - p.requested_at < options_.stream_wait) {
      retry_later(id);
    } else {
      refuse(id,
             kernel_state_ == KernelState::none ? "no kernel was started" : "no kernel is running");
    }
    return;
  }
  std::uint16_t port = info_.port(p.kind);
  std::uint64_t generation = kernel_generation_;
  std::weak_ptr<bool> alive = alive_;
  error_code ec;
  if (p.socket.is_open()) p.socket.close(ec);
  p.socket.open(asio::ip::tcp::v4(), ec);
  if (!ec) ::fcntl(p.socket.native_handle(), F_SETFD, FD_CLOEXEC);
  p.socket.async_connect({asio::ip::address_v4::loopback(), port}, [this, alive, id, port,
                                                                    generation](
                                                                       const error_code& ec) {
    if (alive.expired() || ec == asio::error::operation_aborted) return;
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    PendingStream& p = *it->second;
    error_code lec, rec;
    if (!ec && p.socket.local_endpoint(lec) == p.socket.remote_endpoint(rec) && !lec && !rec) {
      // Retrying a loopback port nobody listens on yet can "succeed" as a TCP self-connect
      // (our ephemeral source port equals the kernel's port): that is not the kernel.
      error_code ignored;
      p.socket.close(ignored);
      retry_later(id);
      return;
    }
    if (!ec && generation == kernel_generation_ && kernel_state_ == KernelState::running) {
      auto socket = std::move(p.socket);
      const ChannelKind kind = p.kind;  // erase() frees p (scripts/sanitize: heap-use-after-free)
      pending_.erase(it);
      spdlog::debug("[{}] stream {} ({}) connected to the kernel's port {}", log_id_, id,
                    to_string(kind), port);
      session_->attach_stream(id, std::move(socket));
      return;
    }
    auto now = std::chrono::steady_clock::now();
    bool kernel_young = now - kernel_started_at_ < options_.stream_wait;
    if (kernel_state_ != KernelState::running || generation != kernel_generation_ || kernel_young) {
      retry_later(id);  // the kernel is still starting (or changed): try again soon
      return;
    }
    refuse(id, std::string("the kernel does not accept connections on its ") + to_string(p.kind) +
                   " port " + std::to_string(port) + ": " + ec.message());
  });
}

void Agent::retry_later(std::uint32_t id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  PendingStream& p = *it->second;
  p.timer.expires_after(p.delay);
  p.delay = std::min(p.delay * 2, std::chrono::milliseconds(250));
  std::weak_ptr<bool> alive = alive_;
  p.timer.async_wait([this, alive, id](const error_code&) {
    // A cancelled wait (kernel just started) retries at once, too.
    if (!alive.expired()) try_connect(id);
  });
}

void Agent::refuse(std::uint32_t id, const std::string& reason) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  spdlog::info("[{}] stream {} ({}) refused: {}", log_id_, id, to_string(it->second->kind), reason);
  pending_.erase(it);
  if (session_) session_->refuse_stream(id, reason);
}

void Agent::refuse_all_pending(const std::string& reason) {
  std::vector<std::uint32_t> ids;
  for (auto& [id, p] : pending_) ids.push_back(id);
  for (auto id : ids) refuse(id, reason);
}

void Agent::send(const nlohmann::json& message) {
  if (session_) session_->send_control(message);
}

void Agent::send_error(const std::string& message) {
  spdlog::warn("[{}] {}", log_id_, message);
  send({{"type", "error"}, {"message", message}});
}

void Agent::stop_and_exit(int code, const std::string& why) {
  if (exiting_code_) return;
  exiting_code_ = code;
  no_bridge_timer_.cancel();
  restart_pending_ = false;
  refuse_all_pending("the agent is exiting (" + why + ")");
  if (kernel_state_ == KernelState::running || kernel_state_ == KernelState::stopping) {
    kernel_state_ = KernelState::stopping;
    kernel_.terminate(options_.kernel_grace);
    return;  // on_kernel_exit finishes
  }
  finish(code);
}

void Agent::finish(int code) {
  if (exit_code_) return;
  exit_code_ = code;
  error_code ec;
  acceptor_.close(ec);
  accept_retry_.cancel();
  no_bridge_timer_.cancel();
  signals_.cancel(ec);
  pending_.clear();
  remove_runtime_files();
  spdlog::info("[{}] exiting with status {}", log_id_, code);
  close_when_flushed(std::chrono::steady_clock::now() + std::chrono::seconds(2));
}

void Agent::close_when_flushed(std::chrono::steady_clock::time_point deadline) {
  // The last events (kernel_exited, agent_terminating) must reach the bridge before the GOODBYE:
  // closing the session drops what the peer has not acknowledged yet. Wait (bounded) until the
  // replay buffer is empty, i.e. the bridge has acknowledged everything.
  std::weak_ptr<bool> alive = alive_;
  bool flushed =
      !session_ || session_->state() != LinkState::up || session_->stats().replay_bytes == 0;
  if (!flushed && std::chrono::steady_clock::now() < deadline) {
    exit_timer_.expires_after(std::chrono::milliseconds(10));
    exit_timer_.async_wait([this, alive, deadline](const error_code& ec) {
      if (!alive.expired() && !ec) close_when_flushed(deadline);
    });
    return;
  }
  int code = *exit_code_;
  if (session_) {
    closing_session_ = true;
    session_->close(code == kAgentExitShutdown ? "agent shut down as requested"
                    : code == kAgentExitNoBridge
                        ? "agent exiting: no bridge"
                        : "agent exiting: " + ProcessExit::signal_name(code - 128));
  }
  // Give the GOODBYE a moment to reach the bridge, then stop.
  exit_timer_.expires_after(std::chrono::milliseconds(300));
  exit_timer_.async_wait([this, alive](const error_code&) {
    if (!alive.expired()) io_.stop();
  });
}

void Agent::remove_runtime_files() {
  if (runtime_subdir_.empty()) return;
  std::error_code ec;
  fs::remove(connection_file_, ec);
  fs::remove_all(runtime_subdir_, ec);
  runtime_subdir_.clear();
}

int run_agent(AgentOptions options) {
  asio::io_context io(1);
  std::unique_ptr<Agent> agent;
  try {
    agent = std::make_unique<Agent>(io, std::move(options));
    agent->start();
  } catch (const AgentError& e) {
    spdlog::error("agent: {}", e.what());
    std::fprintf(stderr, "kernel-bridge agent: %s\n", e.what());
    return kAgentExitUsage;
  }
  io.run();
  int code = agent->exit_code().value_or(1);
  agent.reset();
  return code;
}

}  // namespace kb::tunnel
