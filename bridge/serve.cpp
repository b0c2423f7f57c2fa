#include "bridge/serve.hpp"

#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>

#include "auth/credentials_store.hpp"
#include "bridge/config.hpp"
#include "bridge/control_api.hpp"
#include "bridge/lifecycle.hpp"
#include "bridge/lifecycle_backend.hpp"
#include "bridge/metrics.hpp"
#include "bridge/process_handover.hpp"
#include "common/text.hpp"
#include "ssh/connection.hpp"
#include "store/sqlite_store.hpp"

namespace kb::bridge {

namespace {

std::shared_ptr<const std::string> read_agent(const SiteConfig& site) {
  std::string path = site.agent.path.empty() ? std::string("/proc/self/exe") : site.agent.path;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::runtime_error("site " + site.name + ": cannot read the agent to upload (" + path +
                             "); set agent.path to the kernel-bridge executable");
  }
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return std::make_shared<const std::string>(bytes.str());
}

// Connections to the control API and each kernel's sockets are file descriptors: raise the soft
// limit towards the hard one (systemd's default soft limit is 1024), so that the connection
// limits, not EMFILE, decide who is turned away.
void raise_descriptor_limit(const BridgeConfig& config) {
  struct rlimit limit {};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  const rlim_t wanted = std::min<rlim_t>(limit.rlim_max, 65536);
  if (limit.rlim_cur < wanted) {
    const rlim_t before = limit.rlim_cur;
    limit.rlim_cur = wanted;
    if (::setrlimit(RLIMIT_NOFILE, &limit) == 0) {
      spdlog::debug("open-file limit raised from {} to {}", before, wanted);
    }
  }
  const rlim_t needed = 2 * config.api.max_connections + 256;
  if (limit.rlim_cur < needed) {
    spdlog::warn(
        "the open-file limit ({}) is below what api.max_connections needs for both "
        "listeners ({}); raise LimitNOFILE",
        limit.rlim_cur, needed);
  }
}

// What the lifecycle takes from the configuration; reads each uploaded agent (throws, naming the
// site, if it cannot).
LifecycleOptions lifecycle_options_from(const BridgeConfig& config) {
  LifecycleOptions options;
  for (const auto& site : config.sites) {
    if (site.agent.mode == AgentConfig::Mode::upload) {
      options.agent_uploads[site.name] = read_agent(site);
    }
  }
  options.restart_grace = config.restart_grace;
  options.ended_retention = config.ended_retention;
  options.max_kernels_per_user = config.max_kernels_per_user;
  return options;
}

// How long a planned restart waits for each kernel's link to get quiet (docs/state.md).
constexpr std::chrono::seconds kQuiesceTimeout{5};

// SIGTERM/SIGINT: stop accepting; then shut every kernel down and abort its job, or (bridge.on_stop
// = "keep-kernels") record them and leave them running for the next start — under systemd handing
// every kernel's connections to its file-descriptor store, so the next process resumes them with
// nothing lost; then leave. A second one leaves at once (jobs not yet aborted end by the agent's
// no-bridge timeout).
// SIGUSR2: restart in place (also to run an upgraded binary): hand every kernel's connections over
// and execute the program again, same PID, same arguments.
// SIGHUP: read api.tokens_file again (add or revoke TCP callers without touching the kernels).
class SignalHandler {
 public:
  SignalHandler(boost::asio::io_context& io, ControlApi& api, KernelLifecycle& lifecycle,
                tunnel::SshConnectionPool& pool, OnStop on_stop, ExecSelf self)
      : on_stop_(on_stop),
        self_(std::move(self)),
        io_(io),
        api_(api),
        lifecycle_(lifecycle),
        pool_(pool),
        signals_(io, SIGTERM, SIGINT, SIGHUP) {
    signals_.add(SIGUSR2);
    wait();
  }

 private:
  void wait() {
    signals_.async_wait([this](const boost::system::error_code& ec, int signal) {
      if (ec) return;
      if (on_signal(signal)) wait();
    });
  }

  // Whether to go on waiting for signals.
  bool on_signal(int signal) {
    if (signal == SIGHUP) {
      if (!stopping_) {
        spdlog::info("SIGHUP: reloading the API tokens");
        api_.reload_tokens();
      }
      return true;
    }
    if (signal == SIGUSR2) {
      if (stopping_) return true;
      if (self_.path.empty() || ::access(self_.path.c_str(), X_OK) != 0) {
        spdlog::error("SIGUSR2: cannot restart in place: {} cannot be executed; going on",
                      self_.path.empty() ? std::string("this program") : self_.path);
        return true;
      }
      stopping_ = true;
      notify_service_manager("RELOADING=1\nSTATUS=restarting in place");
      spdlog::info(
          "SIGUSR2: restarting in place ({}); kernels and their connections are handed "
          "over",
          self_.path);
      api_.stop();
      lifecycle_.hand_over(kQuiesceTimeout, [this](std::vector<HandedOver> kernels) {
        const auto package = encode_handover(kernels);
        std::string error;
        reexec_with(self_, package, error);
        // Only on failure: the descriptors may be disturbed; exit, the next start re-attaches.
        spdlog::critical(
            "restart in place failed: {}; exiting (the next start re-attaches the "
            "kernels)",
            error);
        std::_Exit(1);
      });
      return false;
    }
    if (stopping_) {
      spdlog::warn("second signal ({}): exiting without waiting for the kernels' jobs", signal);
      io_.stop();
      return false;
    }
    stopping_ = true;
    api_.stop();
    notify_service_manager("STOPPING=1");
    if (on_stop_ == OnStop::keep_kernels && service_manager_present()) {
      spdlog::info(
          "signal {}: stopping; kernels, agents and jobs keep running, and their "
          "connections are handed to the service manager for the next start",
          signal);
      lifecycle_.hand_over(kQuiesceTimeout, [this](std::vector<HandedOver> kernels) {
        const auto package = encode_handover(kernels);
        std::string error;
        if (!kernels.empty() && !push_to_fdstore(package, error)) {
          spdlog::error(
              "could not hand the connections to the service manager ({}): the next "
              "start re-attaches the kernels with new link sessions",
              error);
        }
        for (int fd : package.fds) ::close(fd);
        signals_.cancel();
        pool_.shutdown_all();
        io_.stop();
      });
      return true;
    }
    if (on_stop_ == OnStop::keep_kernels) {
      spdlog::info("signal {}: stopping; kernels, agents and jobs keep running", signal);
      lifecycle_.detach();
      signals_.cancel();
      pool_.shutdown_all();
      io_.stop();
      return false;
    }
    spdlog::info("signal {}: shutting down (kernels are shut down, their jobs aborted)", signal);
    lifecycle_.shutdown([this] {
      spdlog::info("every kernel released; bye");
      signals_.cancel();
      pool_.shutdown_all();
      io_.stop();
    });
    return true;
  }

  OnStop on_stop_;
  ExecSelf self_;
  boost::asio::io_context& io_;
  ControlApi& api_;
  KernelLifecycle& lifecycle_;
  tunnel::SshConnectionPool& pool_;
  boost::asio::signal_set signals_;
  bool stopping_ = false;
};

// Last line of defence: a handler that throws (a bug) must not take every user's kernels with it.
// Asio lets run() be called again after an exception; the fault is logged and counted.
void run_until_stopped(boost::asio::io_context& io, BridgeMetrics& metrics) {
  for (;;) {
    try {
      io.run();
      return;
    } catch (const std::exception& e) {
      metrics.api_internal_errors.unlabelled().inc();
      spdlog::critical("internal error in an event handler, the bridge goes on: {}",
                       printable(e.what(), 400));
    }
  }
}

// state_dir/state.db, created, migrated or (--start-empty) replaced; throws store::StoreError.
store::SqliteOpened open_state(const BridgeConfig& config, const ServeOptions& options) {
  store::SqliteOptions sqlite;
  sqlite.start_empty_if_unreadable = options.start_empty;
  auto opened = store::open_sqlite_store(config.state_dir + "/state.db", sqlite);
  if (!opened.moved_aside.empty()) {
    spdlog::warn(
        "--start-empty: {}; the file was moved to {} and the bridge starts with no kernels",
        opened.moved_reason, opened.moved_aside);
  }
  if (opened.migrated_from != 0) {
    spdlog::info("state database {} migrated from schema {} to {}", opened.store->where(),
                 opened.migrated_from, store::kSchemaVersion);
  }
  return opened;
}

}  // namespace

int run_serve(const ServeOptions& options) {
  // First, before anything else takes descriptors: what a previous process handed over.
  ExecSelf self = exec_self_now();
  std::string handover_error;
  std::vector<HandedOver> handed_over = receive_handover(handover_error);
  BridgeConfig config;
  try {
    config = load_config(options.config_file);
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s\n", e.what());
    return 2;
  }
  // --log-level on the command line wins over the file's; "info" is its default.
  if (options.command_line_log_level == "info" && config.log_level != "info") {
    spdlog::set_level(spdlog::level::from_str(config.log_level));
  }

  LifecycleOptions lifecycle_options;
  try {
    lifecycle_options = lifecycle_options_from(config);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s\n", e.what());
    return 1;
  }
  store::SqliteOpened state;
  store::Snapshot snapshot;
  try {
    state = open_state(config, options);
    snapshot = state.store->load();
  } catch (const store::StoreError& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s\n", e.what());
    return 2;
  }
  lifecycle_options.store = state.store.get();

  boost::asio::io_context io(1);
  MetricsRegistry registry;
  BridgeMetrics metrics(registry);
  auth::CredentialsStore credentials;
  tunnel::SshConnectionPool pool(io);

  std::map<std::string, std::unique_ptr<JobBackend>> owned_backends;
  std::map<std::string, JobBackend*> backends;
  try {
    for (const auto& site : config.sites) {
      auto backend = make_unicore_backend(io, site, &metrics);
      backends[site.name] = backend.get();
      owned_backends[site.name] = std::move(backend);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s: %s\n", config.file.c_str(), e.what());
    return 2;
  }

  auto lifecycle =
      std::make_unique<KernelLifecycle>(io, config, credentials, &metrics, backends,
                                        make_ssh_link_factory(io, pool), lifecycle_options);
  try {
    if (!handover_error.empty()) spdlog::error("{}", handover_error);
    const std::size_t offered = handed_over.size();
    const RestoreSummary restored = lifecycle->restore(snapshot, std::move(handed_over));
    spdlog::info(
        "state database {}: {} kernel(s) re-attaching ({} of {} handed over by the previous "
        "process, their link sessions resume), {} waiting for their job, {} ended kernel(s) "
        "listed, {} allocation(s) kept for a restart, {} kernel(s) could not be restored",
        state.store->where(), restored.reattaching, restored.handed_over, offered, restored.resumed,
        restored.kept_ended, restored.parked, restored.ended);
  } catch (const store::StoreError& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s\n", e.what());
    return 2;
  }
  auto api = std::make_unique<ControlApi>(io, config, *lifecycle, credentials, metrics);
  try {
    api->start();
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kernel-bridge serve: %s\n", e.what());
    return 1;
  }
  spdlog::info("kernel-bridge serve: {} site(s) from {}; control API on {}; restart grace {}",
               config.sites.size(), config.file,
               config.api.unix_socket.empty() ? std::string("TCP only") : config.api.unix_socket,
               format_duration(config.restart_grace));

  auto signals =
      std::make_unique<SignalHandler>(io, *api, *lifecycle, pool, config.on_stop, std::move(self));
  notify_service_manager("READY=1\nSTATUS=serving " + std::to_string(config.sites.size()) +
                         " site(s)");
  ::signal(SIGPIPE, SIG_IGN);
  raise_descriptor_limit(config);
  run_until_stopped(io, metrics);

  signals.reset();
  api.reset();
  lifecycle.reset();
  pool.shutdown_all();
  owned_backends.clear();
  return 0;
}

}  // namespace kb::bridge
