// The tunnel library's subcommands: `kernel-bridge agent` (compute node) and `kernel-bridge tunnel`
// (standalone hub side for tests and benchmarks: the same tunnel::HubKernel the daemon drives, plus
// what only a command needs — connection files read and rewritten, events and stats as JSON lines
// on stdout). The contract both follow is docs/agent.md and the CLI contract in the integration
// tests (tests/integration).
#include "agent/agent.hpp"
#include "agent/kernel_process.hpp"
#include "cli/commands.hpp"
#include "common/overloaded.hpp"
#include "link/connection_file.hpp"
#include "ssh/connection.hpp"
#include "tunnel/hub_kernel.hpp"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/streambuf.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

namespace kb::tunnel {

namespace {

namespace asio = boost::asio;
using boost::system::error_code;

std::chrono::milliseconds seconds_option(double seconds) {
  return std::chrono::milliseconds(static_cast<long long>(seconds * 1000.0 + 0.5));
}

[[noreturn]] void usage_error(const std::string& command, const std::string& message) {
  std::fprintf(stderr, "kernel-bridge %s: %s\n", command.c_str(), message.c_str());
  throw kb::ExitStatus{2};
}

// ---------------------------------------------------------------------------------------------
// kernel-bridge agent

struct AgentArgs {
  std::string listen;
  std::string secret_file;
  std::string discovery_file = "kernel-bridge-agent.json";
  std::string runtime_dir;
  double no_bridge_timeout = 600;
  double kernel_grace = 5;
  std::vector<std::string> kernel_argv;
};

void add_agent(CLI::App& app) {
  auto args = std::make_shared<AgentArgs>();
  CLI::App* sub = app.add_subcommand(
      "agent",
      "kernel-bridge agent --listen ADDR[:PORT] --secret-file FILE [options] -- KERNEL_ARGV...\n"
      "Run on the compute node as the batch job's main process: listen for the bridge, start the "
      "kernel (bound to 127.0.0.1) when the authenticated bridge asks, relay its five channels, "
      "report its start and exit. See docs/agent.md.");
  sub->add_option("--listen", args->listen,
                  "ADDR[:PORT] on the compute node's network where the bridge connects (reached "
                  "through the login node's sshd). PORT 0 or omitted: an ephemeral port, "
                  "published in the discovery file. Required.");
  sub->add_option("--secret-file", args->secret_file,
                  "The per-kernel link secret shared with the bridge (64 hex characters; the file "
                  "must not be readable by group or others). Required.");
  sub->add_option("--discovery-file", args->discovery_file,
                  "Where to write {host, port, pid, hostname, version} once listening (atomic "
                  "rename, mode 0644, no secret in it)")
      ->capture_default_str();
  sub->add_option("--runtime-dir", args->runtime_dir,
                  "Node-local directory for the kernel's connection file; the agent makes a 0700 "
                  "subdirectory in it and removes it at exit. Default: $TMPDIR, else /tmp");
  sub->add_option("--no-bridge-timeout", args->no_bridge_timeout,
                  "Seconds without an authenticated bridge (at start, or after the link went "
                  "down) before the agent kills the kernel and exits with status 3, so an "
                  "orphaned job does not burn compute hours. 0 = wait forever")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--kernel-grace", args->kernel_grace,
                  "Seconds between SIGTERM and SIGKILL when the kernel (and the processes it "
                  "started) is stopped")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("kernel_argv", args->kernel_argv,
                  "The kernel command, after '--'. Every '{connection_file}' is replaced by the "
                  "path of the connection file the agent writes, e.g. -- /usr/bin/python3 -m "
                  "ipykernel_launcher -f {connection_file}");
  sub->footer(
      "Exit status: 0 after the bridge asked for shutdown; 2 bad usage or configuration; 3 no "
      "authenticated bridge within --no-bridge-timeout; 128+N after signal N (SIGTERM: 143), "
      "once the kernel is stopped. SIGTERM/SIGINT/SIGHUP: tell the bridge (agent_terminating), "
      "stop the kernel, exit.");
  sub->callback([args] {
    if (args->listen.empty()) usage_error("agent", "--listen ADDR[:PORT] is required");
    if (args->secret_file.empty()) usage_error("agent", "--secret-file FILE is required");
    if (args->kernel_argv.empty()) {
      usage_error("agent",
                  "no kernel command: give it after '--', e.g. -- /usr/bin/python3 -m "
                  "ipykernel_launcher -f {connection_file}");
    }
    AgentOptions options;
    try {
      parse_listen_address(args->listen, options.listen_host, options.listen_port);
    } catch (const AgentError& e) {
      usage_error("agent", e.what());
    }
    options.secret_file = args->secret_file;
    options.discovery_file = args->discovery_file;
    options.runtime_dir = args->runtime_dir;
    options.no_bridge_timeout = seconds_option(args->no_bridge_timeout);
    options.kernel_grace = seconds_option(args->kernel_grace);
    options.kernel_argv = args->kernel_argv;
    bool has_placeholder = false;
    for (const auto& a : options.kernel_argv) {
      has_placeholder |= a.find("{connection_file}") != std::string::npos;
    }
    if (!has_placeholder) {
      spdlog::warn(
          "agent: the kernel command has no {{connection_file}}: the kernel will not "
          "know the ports and key the agent chose");
    }
    ::signal(SIGPIPE, SIG_IGN);
    int code = run_agent(std::move(options));
    if (code != 0) throw kb::ExitStatus{code};
  });
}

// ---------------------------------------------------------------------------------------------
// kernel-bridge tunnel

struct TunnelArgs {
  std::string ssh_host;
  int ssh_port = 22;
  std::string ssh_user;
  std::string identity;
  std::string known_hosts;
  std::string cipher;
  double keepalive_interval = 15;
  int keepalive_count = 2;
  double reconnect_max = 10;
  bool direct = false;
  std::string bind = "127.0.0.1";
  std::vector<std::string> kernels;
  std::string kernels_file;
};

struct KernelSpec {
  std::string connection_file;
  std::string agent_host;
  std::uint16_t agent_port = 0;
  std::string agent;
  std::string secret_file;
};

KernelSpec parse_kernel_spec(const std::string& connection_file, const std::string& agent,
                             const std::string& secret_file, const std::string& where) {
  KernelSpec spec;
  spec.connection_file = connection_file;
  spec.secret_file = secret_file;
  spec.agent = agent;
  if (connection_file.empty() || agent.empty() || secret_file.empty()) {
    usage_error("tunnel",
                where + ": needs a connection file, an agent HOST:PORT and a secret file");
  }
  try {
    parse_listen_address(agent, spec.agent_host, spec.agent_port);
  } catch (const AgentError& e) {
    usage_error("tunnel", where + ": agent address " + agent + " is invalid");
  }
  if (spec.agent_port == 0) usage_error("tunnel", where + ": agent " + agent + " needs a port");
  return spec;
}

std::vector<KernelSpec> collect_kernels(const TunnelArgs& args) {
  std::vector<KernelSpec> specs;
  for (const auto& k : args.kernels) {
    // CONNECTION_FILE,AGENT_HOST:PORT,SECRET_FILE — split at the first and the last comma.
    auto first = k.find(',');
    auto last = k.rfind(',');
    if (first == std::string::npos || first == last) {
      usage_error("tunnel",
                  "--kernel " + k + ": expected CONNECTION_FILE,AGENT_HOST:PORT,SECRET_FILE");
    }
    specs.push_back(parse_kernel_spec(k.substr(0, first), k.substr(first + 1, last - first - 1),
                                      k.substr(last + 1), "--kernel " + k));
  }
  if (!args.kernels_file.empty()) {
    std::ifstream in(args.kernels_file);
    if (!in) usage_error("tunnel", "--kernels-file " + args.kernels_file + ": cannot read it");
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_discarded() || !j.is_array()) {
      usage_error("tunnel", "--kernels-file " + args.kernels_file +
                                ": expected a JSON array of {\"connection_file\", \"agent\", "
                                "\"secret_file\"} objects");
    }
    for (std::size_t i = 0; i < j.size(); ++i) {
      const auto& e = j[i];
      std::string where = "--kernels-file " + args.kernels_file + " entry " + std::to_string(i);
      if (!e.is_object()) usage_error("tunnel", where + ": not an object");
      auto str = [&](const char* field) {
        auto it = e.find(field);
        if (it == e.end() || !it->is_string()) {
          usage_error("tunnel", where + ": field \"" + field + "\" missing or not a string");
        }
        return it->get<std::string>();
      };
      specs.push_back(
          parse_kernel_spec(str("connection_file"), str("agent"), str("secret_file"), where));
    }
  }
  if (specs.empty()) usage_error("tunnel", "no kernels: give --kernel or --kernels-file");
  return specs;
}

// 500 kernels × (5 listeners + their clients + agent links) exceed the usual soft limit of 1024.
void raise_fd_limit() {
  struct rlimit lim {};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur >= lim.rlim_max) return;
  rlim_t before = lim.rlim_cur;
  lim.rlim_cur = lim.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &lim) == 0) {
    spdlog::debug("tunnel: open-file limit raised from {} to {}", before, lim.rlim_cur);
  } else {
    spdlog::warn("tunnel: cannot raise the open-file limit above {}", before);
  }
}

// One line of JSON per event on stdout, flushed at once (tests and benchmarks read it live).
void print_event(const nlohmann::json& event) {
  std::string line = event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
}

// A kernel's event as the line the tunnel prints: {"event": name, "kernel": index, ...}. This is
// the tunnel's output contract (tests/integration, bench/tunnel and the --help footer rely on it).
nlohmann::json event_json(int kernel, const HubEvent& event) {
  namespace e = hub_event;
  nlohmann::json j =
      std::visit(kb::Overloaded{
                     [](const e::Listening& l) {
                       nlohmann::json ports = nlohmann::json::object();
                       for (ChannelKind kind : kAllChannelKinds) {
                         ports[to_string(kind)] = l.ports[static_cast<std::size_t>(kind)];
                       }
                       return nlohmann::json{{"event", "listening"}, {"ports", ports}};
                     },
                     [](const e::LinkUp&) {
                       return nlohmann::json{{"event", "link_up"}};
                     },
                     [](const e::LinkDown& d) {
                       return nlohmann::json{{"event", "link_down"}, {"reason", d.reason}};
                     },
                     [](const e::KernelStarted& s) {
                       return nlohmann::json{
                           {"event", "kernel_started"}, {"pid", s.pid}, {"restart", s.restart}};
                     },
                     [](const e::KernelExited& x) {
                       return nlohmann::json{
                           {"event", "kernel_exited"},
                           {"code", x.code ? nlohmann::json(*x.code) : nlohmann::json()},
                           {"signal", x.signal ? nlohmann::json(ProcessExit::signal_name(*x.signal))
                                               : nlohmann::json()}};
                     },
                     [](const e::AgentTerminating& t) {
                       return nlohmann::json{{"event", "agent_terminating"}, {"reason", t.reason}};
                     },
                     [](const e::Error& r) {
                       return nlohmann::json{{"event", "error"}, {"message", r.message}};
                     },
                     [](const e::Closed& c) {
                       return nlohmann::json{{"event", "closed"}, {"reason", c.reason}};
                     },
                 },
                 event);
  j["kernel"] = kernel;
  return j;
}

// A kernel's entry in the "stats" line.
nlohmann::json stats_json(int kernel, const std::string& agent, const HubKernelStats& stats) {
  const LinkSession::Stats& s = stats.link;
  nlohmann::json j = {{"kernel", kernel}, {"agent", agent}};
  j["state"] = to_string(stats.state);
  j["bytes_in"] = s.bytes_in;
  j["bytes_out"] = s.bytes_out;
  j["frames_in"] = s.frames_in;
  j["frames_out"] = s.frames_out;
  j["resumes"] = s.resumes;
  j["retransmitted_bytes"] = s.retransmitted_bytes;
  j["auth_failures"] = s.auth_failures;
  j["streams"] = s.streams;
  j["streams_opened"] = s.streams_opened;
  j["replay_bytes"] = s.replay_bytes;
  j["attempts"] = stats.attempts;
  nlohmann::json out = nlohmann::json::object(), in = nlohmann::json::object();
  for (ChannelKind kind : kAllChannelKinds) {
    out[to_string(kind)] = s.stream_bytes_out[static_cast<std::size_t>(kind)];
    in[to_string(kind)] = s.stream_bytes_in[static_cast<std::size_t>(kind)];
  }
  j["stream_bytes_out"] = out;
  j["stream_bytes_in"] = in;
  return j;
}

// Reads a kernel's connection file (ports 0 allowed: chosen by the listeners). Throws
// ConnectionFileError naming the file and the field.
ConnectionInfo read_hub_connection_file(const std::string& path, const std::string& bind) {
  ConnectionInfo info = read_connection_file(path, ParseOptions{.allow_zero_ports = true});
  error_code ec;
  auto address = asio::ip::make_address(bind, ec);
  if (!ec && !address.is_unspecified() && info.ip != bind &&
      !(info.ip == "localhost" && address.is_loopback())) {
    spdlog::warn(
        "tunnel: connection file {} says ip {} but the listeners bind {}: clients using "
        "the file may not reach them",
        path, info.ip, bind);
  }
  return info;
}

class TunnelRunner {
 public:
  TunnelRunner(const TunnelArgs& args, std::vector<KernelSpec> specs)
      : args_(args), specs_(std::move(specs)), pool_(io_), signals_(io_), stdin_(io_) {}

  int run() {
    raise_fd_limit();
    ::signal(SIGPIPE, SIG_IGN);
    std::shared_ptr<SshConnection>& ssh = ssh_;
    if (!args_.direct) {
      SshOptions o;
      o.host = args_.ssh_host;
      o.port = static_cast<std::uint16_t>(args_.ssh_port);
      o.user = args_.ssh_user;
      o.identity_file = args_.identity;
      o.known_hosts_file = args_.known_hosts;
      o.ciphers = args_.cipher;
      o.keepalive_interval = seconds_option(args_.keepalive_interval);
      o.keepalive_count_max = args_.keepalive_count;
      o.backoff_max = std::max(o.backoff_min, seconds_option(args_.reconnect_max));
      ssh = pool_.get(o);
      ssh->on_state_change([this](SshConnection::State state, const std::string& reason) {
        const char* name = nullptr;
        switch (state) {
          case SshConnection::State::connected:
            name = "connected";
            break;
          case SshConnection::State::reconnecting:
            name = "reconnecting";
            break;
          case SshConnection::State::failed:
            name = "failed";
            ssh_failed_ = true;
            break;
          default:
            break;
        }
        if (!name) return;
        nlohmann::json e = {{"event", "ssh"}, {"state", name}};
        if (!reason.empty()) e["reason"] = reason;
        print_event(e);
      });
    }

    for (std::size_t i = 0; i < specs_.size(); ++i) {
      const KernelSpec& spec = specs_[i];
      HubKernel::Options o;
      o.index = static_cast<int>(i);
      o.bind_address = args_.bind;
      o.agent = spec.agent;
      o.backoff_max = std::max(o.backoff_min, seconds_option(args_.reconnect_max));
      try {
        o.secret = kb::auth::LinkSecret::read_file(spec.secret_file);
      } catch (const kb::auth::SecretError& e) {
        usage_error("tunnel", e.what());
      }
      TransportProvider provider;
      if (args_.direct) {
        provider = make_direct_provider(io_, spec.agent_host, spec.agent_port);
      } else {
        provider = [ssh, host = spec.agent_host,
                    port = spec.agent_port](std::function<void(TransportResult)> done) {
          ssh->async_open_channel(
              host, port,
              [done = std::move(done)](error_code ec, std::string message, ByteTransportPtr t) {
                TransportResult r;
                r.permanent = ec && is_permanent_ssh_error(ec);
                r.ec = ec;
                r.message = std::move(message);
                r.transport = std::move(t);
                if (r.ec && r.message.empty()) r.message = r.ec.message();
                done(std::move(r));
              });
        };
      }
      int index = o.index;
      std::shared_ptr<HubKernel> kernel;
      try {
        o.connection = read_hub_connection_file(spec.connection_file, args_.bind);
        bool choose = false;
        for (auto port : o.connection.ports) choose |= port == 0;
        kernel =
            HubKernel::create(io_, std::move(o), std::move(provider),
                              [index](const HubEvent& e) { print_event(event_json(index, e)); });
        const ConnectionInfo& bound = kernel->listen();
        // The file names the chosen ports before "listening" is printed: whoever reads that line
        // may read the file at once.
        if (choose) write_connection_file(spec.connection_file, bound);
        kernel->start();
      } catch (const HubKernelError& e) {
        start_failed(std::string(e.what()) + " (ports from " + spec.connection_file +
                     "; stop the program that holds the port, or set it to 0 there to let the "
                     "tunnel choose one)");
      } catch (const std::exception& e) {
        start_failed(e.what());
      }
      kernels_.push_back(std::move(kernel));
    }

    signals_.add(SIGINT);
    signals_.add(SIGTERM);
    wait_signal();
    start_stdin();
    io_.run();
    kernels_.clear();
    ssh_.reset();
    pool_.shutdown_all();
    return ssh_failed_ ? 1 : 0;
  }

 private:
  [[noreturn]] void start_failed(const std::string& message) {
    std::fprintf(stderr, "kernel-bridge tunnel: %s\n", message.c_str());
    for (auto& k : kernels_) k->close("start-up failed");
    throw kb::ExitStatus{2};
  }

  void wait_signal() {
    signals_.async_wait([this](const error_code& ec, int sig) {
      if (ec) return;
      if (quitting_) {
        spdlog::warn("tunnel: second signal: exiting without waiting for the agents");
        io_.stop();
        return;
      }
      spdlog::info("tunnel: {} received: shutting every kernel down",
                   sig == SIGINT ? "SIGINT" : "SIGTERM");
      quit();
      wait_signal();
    });
  }

  void start_stdin() {
    int fd = ::dup(0);
    error_code ec;
    if (fd >= 0) stdin_.assign(fd, ec);
    if (fd < 0 || ec) {
      spdlog::warn("tunnel: stdin cannot be read ({}); commands are unavailable",
                   fd < 0 ? std::strerror(errno) : ec.message());
      if (fd >= 0 && ec) ::close(fd);
      return;
    }
    read_command();
  }

  void read_command() {
    asio::async_read_until(stdin_, input_, '\n', [this](const error_code& ec, std::size_t n) {
      if (ec == asio::error::eof || ec == asio::error::operation_aborted) return;  // EOF: ignored
      if (ec == asio::error::not_found) {
        print_event({{"event", "error"}, {"message", "command line too long; ignored"}});
        input_.consume(input_.size());
        read_command();
        return;
      }
      if (ec) {
        spdlog::warn("tunnel: reading stdin failed: {}; commands are unavailable", ec.message());
        return;
      }
      std::string line(asio::buffers_begin(input_.data()),
                       asio::buffers_begin(input_.data()) + static_cast<std::ptrdiff_t>(n));
      input_.consume(n);
      handle_command(line);
      read_command();
    });
  }

  void handle_command(const std::string& line) {
    std::istringstream in(line);
    std::string verb;
    in >> verb;
    if (verb.empty()) return;
    if (verb == "quit") {
      quit();
      return;
    }
    if (verb == "stats") {
      nlohmann::json kernels = nlohmann::json::array();
      for (std::size_t i = 0; i < kernels_.size(); ++i) {
        kernels.push_back(stats_json(static_cast<int>(i), specs_[i].agent, kernels_[i]->stats()));
      }
      nlohmann::json e = {{"event", "stats"}, {"kernels", kernels}};
      if (ssh_) {
        auto c = ssh_->counters();
        e["ssh"] = {{"state", to_string(ssh_->state())},
                    {"bytes_in", c.bytes_in},
                    {"bytes_out", c.bytes_out},
                    {"connects", c.connects},
                    {"reconnects", c.reconnects},
                    {"channels_open", c.channels_open},
                    {"channels_opened", c.channels_opened}};
      }
      print_event(e);
      return;
    }
    if (verb == "interrupt" || verb == "restart" || verb == "shutdown") {
      long index = -1;
      std::string extra;
      if (!(in >> index) || (in >> extra) || index < 0 ||
          index >= static_cast<long>(kernels_.size())) {
        print_event({{"event", "error"},
                     {"message", "usage: " + verb + " N, with N from 0 to " +
                                     std::to_string(kernels_.size() - 1)}});
        return;
      }
      auto& k = kernels_[static_cast<std::size_t>(index)];
      if (verb == "interrupt") k->interrupt();
      if (verb == "restart") k->restart();
      if (verb == "shutdown") k->shutdown(nullptr);
      return;
    }
    print_event({{"event", "error"},
                 {"message", "unknown command '" + verb +
                                 "'; commands: interrupt N, restart N, shutdown N, stats, quit"}});
  }

  void quit() {
    if (quitting_) return;
    quitting_ = true;
    auto remaining = std::make_shared<std::size_t>(kernels_.size());
    auto all_done = [this] {
      error_code ec;
      signals_.cancel(ec);
      stdin_.close(ec);
      pool_.shutdown_all();
      io_.stop();
    };
    if (*remaining == 0) {
      all_done();
      return;
    }
    for (auto& k : kernels_) {
      k->shutdown([remaining, all_done] {
        if (--*remaining == 0) all_done();
      });
    }
  }

  TunnelArgs args_;
  std::vector<KernelSpec> specs_;
  asio::io_context io_{1};
  SshConnectionPool pool_;
  asio::signal_set signals_;
  asio::posix::stream_descriptor stdin_;
  asio::streambuf input_{64 * 1024};
  std::vector<std::shared_ptr<HubKernel>> kernels_;
  bool quitting_ = false;
  bool ssh_failed_ = false;
  std::shared_ptr<SshConnection> ssh_;
};

void add_tunnel(CLI::App& app) {
  auto args = std::make_shared<TunnelArgs>();
  CLI::App* sub = app.add_subcommand(
      "tunnel",
      "Standalone hub side (tests, benchmarks): for each kernel, five local endpoints on --bind "
      "and a link to its agent, all kernels through ONE SSH connection (or --direct TCP). JSON "
      "events on stdout; commands on stdin: interrupt N, restart N, shutdown N, stats, quit.");
  sub->add_option("--ssh-host", args->ssh_host,
                  "Login host to reach the agents through (required unless --direct); also the "
                  "name looked up in --known-hosts");
  sub->add_option("--ssh-port", args->ssh_port, "sshd port on the login host")
      ->capture_default_str()
      ->check(CLI::Range(1, 65535));
  sub->add_option("--ssh-user", args->ssh_user, "User on the login host. Default: $USER");
  sub->add_option("--identity", args->identity,
                  "Private key file (OpenSSH format, no passphrase); required unless --direct");
  sub->add_option("--known-hosts", args->known_hosts,
                  "known_hosts file: the only place the login host's key is trusted from (unknown "
                  "or changed key: refused); required unless --direct");
  sub->add_option("--cipher", args->cipher,
                  "SSH cipher(s), e.g. aes128-gcm@openssh.com. Default: libssh's list");
  sub->add_option("--keepalive-interval", args->keepalive_interval,
                  "Seconds between SSH keepalives when the connection is idle")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--keepalive-count", args->keepalive_count,
                  "Unanswered keepalives after which the SSH connection is declared dead and "
                  "re-established")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--reconnect-max", args->reconnect_max,
                  "Longest delay (seconds) between reconnect attempts (exponential backoff with "
                  "jitter, SSH and each kernel's link)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_flag("--direct", args->direct,
                "No SSH: connect straight to each agent over TCP (comparisons and tests)");
  sub->add_option("--bind", args->bind, "Address of the hub-side listeners")->capture_default_str();
  sub->add_option("--kernel", args->kernels,
                  "CONNECTION_FILE,AGENT_HOST:PORT,SECRET_FILE (repeatable). The connection "
                  "file's ports are used as given; 0 = choose one and rewrite the file");
  sub->add_option("--kernels-file", args->kernels_file,
                  "JSON array of {\"connection_file\", \"agent\": \"host:port\", "
                  "\"secret_file\"} (for hundreds of kernels)");
  sub->footer(
      "Events (stdout, one JSON object per line): listening, link_up, link_down, kernel_started, "
      "kernel_exited, agent_terminating, ssh, error, closed, stats. EOF on stdin is ignored; "
      "quit, SIGINT or SIGTERM shut every kernel down and exit. Exit status: 0 normal; 2 bad "
      "usage or configuration; 1 the SSH connection failed permanently (host key or "
      "authentication refused).");
  sub->callback([args] {
    if (!args->direct) {
      if (args->ssh_host.empty()) usage_error("tunnel", "--ssh-host is required (or --direct)");
      if (args->identity.empty()) usage_error("tunnel", "--identity is required (or --direct)");
      if (args->known_hosts.empty()) {
        usage_error("tunnel",
                    "--known-hosts is required (or --direct): host keys are checked "
                    "strictly");
      }
      if (args->ssh_user.empty()) {
        const char* user = std::getenv("USER");
        if (!user || !*user) usage_error("tunnel", "--ssh-user is required ($USER is not set)");
        args->ssh_user = user;
      }
    }
    auto specs = collect_kernels(*args);
    TunnelRunner runner(*args, std::move(specs));
    int code = runner.run();
    if (code != 0) throw kb::ExitStatus{code};
  });
}

}  // namespace

void add_commands(CLI::App& app) {
  add_agent(app);
  add_tunnel(app);
}

}  // namespace kb::tunnel
