#include "bridge/lifecycle.hpp"

#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>

#include "auth/secret.hpp"
#include "bridge/metrics.hpp"
#include "common/overloaded.hpp"
#include "tunnel/kernel_process.hpp"
#include "tunnel/link_session.hpp"

namespace kb::bridge {

namespace asio = boost::asio;
using unicore::JobStatus;

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool contains(const std::string& haystack, const char* needle) {
  return lower(haystack).find(needle) != std::string::npos;
}

std::string last_segment(const std::string& url) {
  auto end = url.find_last_not_of('/');
  if (end == std::string::npos) return url;
  auto slash = url.rfind('/', end);
  return url.substr(slash == std::string::npos ? 0 : slash + 1, end - (slash == std::string::npos ? 0 : slash + 1) + 1);
}

bool is_walltime_message(const std::string& message) {
  return contains(message, "time limit") || contains(message, "timeout") ||
         contains(message, "walltime") || contains(message, "wall time");
}

bool is_cancel_message(const std::string& message) {
  return contains(message, "abort") || contains(message, "cancel");
}

bool live(KernelState s) { return s != KernelState::ended; }

}  // namespace

// ------------------------------------------------------------------------------------------------
// State

// Where an allocation is in its life. Phases only move forward (Allocation::set_phase), and the
// bridge may go to releasing from any of them. Being parked is not a phase: a parked allocation (no
// kernel attached, `kernel_id` empty) goes on through the phases as its job starts, so that the
// kernel that reuses it picks it up wherever it got to.
enum class AllocationPhase {
  submitting,   // the hub-side listeners are bound; the job is being submitted (no job URL yet)
  submitted,    // UNICORE accepted the job: agent upload, start, the batch queue
  discovering,  // the job runs; the bridge reads the agent's discovery file
  connecting,   // the agent's address is known; the link connects; no kernel has started yet
  serving,      // a kernel started in the job (it may have exited, restarted, lost the link since)
  releasing,    // teardown: the agent is asked to stop its kernel, the link closes
  aborting,     // the bridge asked UNICORE to abort the job; the allocation goes once it answers
};

const char* to_string(AllocationPhase phase) {
  switch (phase) {
    case AllocationPhase::submitting: return "submitting";
    case AllocationPhase::submitted: return "submitted";
    case AllocationPhase::discovering: return "discovering";
    case AllocationPhase::connecting: return "connecting";
    case AllocationPhase::serving: return "serving";
    case AllocationPhase::releasing: return "releasing";
    case AllocationPhase::aborting: return "aborting";
  }
  return "?";
}

struct KernelLifecycle::Allocation {
  explicit Allocation(kb::Clock& clock)
      : discovery_timer(clock), connect_timer(clock), grace_timer(clock), rewatch_timer(clock) {}

  std::string log_id;  // the first kernel's id
  std::string owner;
  const SiteConfig* site = nullptr;
  JobBackend* backend = nullptr;
  HubConnection connection;  // for matching a restart's create (ports + key)
  std::array<std::uint16_t, 5> ports{};
  ResourceRequest resources;
  std::unique_ptr<KernelLink> link;
  std::shared_ptr<unicore::JobWatcher> watcher;
  unicore::Credentials last_credentials;  // fallback when the store has none any more (abort)
  std::string job_url, job_id, working_dir, queue, node;
  std::optional<JobStatus> job_status;  // the last one UNICORE reported
  AgentAddress agent;  // from the discovery file, on entering connecting
  AllocationPhase phase = AllocationPhase::submitting;
  // Not phases: each of these changes independently of the phase, or back and forth within one.
  // The job's end as UNICORE reports it (or that the job no longer exists): it comes from the site
  // in any phase, also while the bridge releases the allocation (then there is nothing to abort).
  bool job_terminal = false;
  // The agent announced that the job ends (SIGTERM at walltime, scancel): in any phase from
  // connecting on, whether or not a kernel started. The job's end, which follows, says why.
  bool agent_terminating = false;
  // The link closed for good, or SSH refused it: can happen in any phase. No kernel reuses the
  // allocation after that.
  bool link_dead = false;
  // The link now (up ⇄ down, again and again), and whether it ever was up (a LinkUp after that is a
  // reconnect).
  bool link_up = false, ever_up = false;
  // The kernel process in the job now: it runs; a restart was asked for and the new one has not
  // started yet. Both change with every restart.
  bool kernel_running = false, restart_pending = false;
  kb::ClockTimer discovery_timer, connect_timer, grace_timer, rewatch_timer;
  int refused_watches = 0;    // polls of the job refused in a row (the user's token expired)
  int refused_discovery = 0;  // reads of the discovery file refused in a row
  std::chrono::milliseconds discovery_delay{0};
  kb::Clock::time_point running_since{};
  std::string kernel_id;  // the kernel using the allocation now; empty while parked
  std::string last_link_error;
  LinkTraffic sampled;  // traffic already counted in the metrics

  // Moves the phase forward to `next`; never back (an event that comes late, such as a kernel
  // start while the allocation is released, leaves the phase where it is).
  void set_phase(AllocationPhase next) {
    if (next <= phase) return;
    spdlog::debug("[{}] allocation {} → {}", log_id, to_string(phase), to_string(next));
    phase = next;
  }
  // From teardown on: the bridge releases the allocation, or waits for its job's abort.
  bool releasing() const { return phase >= AllocationPhase::releasing; }
};

struct KernelLifecycle::Kernel {
  KernelView view;
  AllocPtr alloc;  // while attached
  // On clock_ (steady, and the tests' fake time), unlike the view's wall-clock timestamps.
  kb::Clock::time_point ended_at{};
  std::chrono::seconds lease{0};  // KernelRequest::lease
  kb::Clock::time_point last_watch{};
};

KernelLifecycle::KernelLifecycle(asio::io_context& io, const BridgeConfig& config,
                                 CredentialsStore& credentials, BridgeMetrics* metrics,
                                 std::map<std::string, JobBackend*> backends,
                                 KernelLinkFactory links, LifecycleOptions options)
    : io_(io),
      config_(config),
      credentials_(credentials),
      metrics_(metrics),
      backends_(std::move(backends)),
      links_(std::move(links)),
      options_(std::move(options)),
      real_clock_(options_.clock ? nullptr : std::make_unique<kb::AsioClock>(io)),
      clock_(options_.clock ? *options_.clock : *real_clock_),
      tick_timer_(clock_) {
  for (const auto& site : config_.sites) {
    site_health_[site.name]["unicore"] = {"site " + site.name + ": unicore " + site.unicore_url, true,
                                          ""};
    std::string login = site.login_hosts.empty() ? "(none)" : site.login_hosts.front().str();
    site_health_[site.name]["ssh"] = {"site " + site.name + ": ssh " + login, true, ""};
  }
  update_state_gauges();
  tick();
}

KernelLifecycle::~KernelLifecycle() {
  *alive_ = false;
  tick_timer_.cancel();
  for (auto& alloc : allocations_) {
    alloc->discovery_timer.cancel();
    alloc->connect_timer.cancel();
    alloc->grace_timer.cancel();
    if (alloc->watcher) alloc->watcher->stop();
    alloc->link.reset();
  }
}

KernelLifecycle::Kernel* KernelLifecycle::find(std::string_view id) {
  auto it = kernels_.find(id);
  return it == kernels_.end() ? nullptr : &it->second;
}

const KernelLifecycle::Kernel* KernelLifecycle::find(std::string_view id) const {
  auto it = kernels_.find(id);
  return it == kernels_.end() ? nullptr : &it->second;
}

KernelLifecycle::Kernel* KernelLifecycle::attached(const AllocPtr& alloc) {
  if (!alloc || alloc->kernel_id.empty()) return nullptr;
  Kernel* k = find(alloc->kernel_id);
  if (!k || k->alloc != alloc || !live(k->view.state)) return nullptr;
  return k;
}

void KernelLifecycle::changed(Kernel& k) {
  ++k.view.version;
  KernelView copy = k.view;
  notify_changed(copy);
}

void KernelLifecycle::set_state(Kernel& k, KernelState state) {
  if (k.view.state == state && !k.view.history.empty()) return;
  spdlog::info("[{}] {} → {}", k.view.id,
               k.view.history.empty() ? std::string("new") : std::string(to_string(k.view.state)),
               to_string(state));
  k.view.state = state;
  k.view.history.push_back({state, Clock::now()});
  update_state_gauges();
  changed(k);
}

void KernelLifecycle::progress(Kernel& k, std::string message) {
  spdlog::info("[{}] {}", k.view.id, message);
  k.view.progress.push_back({Clock::now(), std::move(message)});
  while (k.view.progress.size() > options_.max_progress) {
    k.view.progress.erase(k.view.progress.begin());
  }
  changed(k);
}

void KernelLifecycle::progress(const AllocPtr& alloc, std::string message) {
  if (Kernel* k = attached(alloc)) {
    progress(*k, std::move(message));
  } else {
    spdlog::info("[{}] (allocation) {}", alloc->log_id, message);
  }
}

void KernelLifecycle::update_state_gauges() {
  if (!metrics_) return;
  std::map<KernelState, int> counts;
  for (const auto& [id, k] : kernels_) ++counts[k.view.state];
  for (auto state : kAllKernelStates) {
    metrics_->kernels.with({std::string(to_string(state))}).set(counts[state]);
  }
}

unicore::Credentials KernelLifecycle::credentials_for(const Allocation& alloc) {
  if (auto token = credentials_.token(alloc.owner)) return unicore::Credentials::bearer(*token);
  return alloc.last_credentials;
}

void KernelLifecycle::note_site(const std::string& site, const std::string& component, bool ok,
                                const std::string& detail) {
  auto it = site_health_.find(site);
  if (it == site_health_.end()) return;
  auto& check = it->second[component];
  check.ok = ok;
  check.detail = ok ? std::string() : detail;
}

// ------------------------------------------------------------------------------------------------
// KernelService

void KernelLifecycle::create(const Caller& caller, KernelRequest request, CreateCallback done) {
  auto fail = [&done](ServiceErrorKind kind, std::string message, std::string field = {},
                      std::string limit = {}) {
    done(ServiceError{kind, std::move(message), std::move(field), std::move(limit)});
  };
  if (shutting_down_) {
    return fail(ServiceErrorKind::unavailable,
                "the bridge is shutting down; start the kernel again once it is back");
  }
  const SiteConfig* site = config_.find_site(request.site);
  auto backend = backends_.find(request.site);
  if (!site || backend == backends_.end()) {
    return fail(ServiceErrorKind::invalid_request, "unknown site '" + request.site + "'", "site");
  }
  if (request.kernel_argv.empty()) {
    return fail(ServiceErrorKind::invalid_request, "the kernel's argv is empty", "kernel_argv");
  }
  auto token = credentials_.token(caller.user);
  if (!token) {
    auto info = credentials_.info(caller.user);
    return fail(ServiceErrorKind::credentials_missing,
                std::string("no ") + (info.status == CredentialsStore::Status::expired ? "unexpired " : "") +
                    "UNICORE token for user " + caller.user +
                    ": the hub pushes it (PUT /v1/users/" + caller.user +
                    "/credentials) when you log in; log in to JupyterHub again, or push one");
  }
  const HubConnection& hub = request.connection;
  std::array<std::uint16_t, 5> asked{hub.shell_port, hub.iopub_port, hub.stdin_port,
                                     hub.control_port, hub.hb_port};
  auto overlaps = [&](const Allocation& a) {
    if (a.connection.ip != hub.ip) return false;
    for (auto p : asked) {
      if (p == 0) continue;
      for (auto q : a.ports) {
        if (p == q) return true;
      }
    }
    return false;
  };

  // A Jupyter restart: the same owner asks again for the same endpoints and key within the grace.
  AllocPtr reuse;
  for (const auto& a : std::vector<AllocPtr>(allocations_)) {
    if (a->releasing() || !a->kernel_id.empty() || !overlaps(*a)) continue;
    bool same = a->owner == caller.user && a->site == site && a->ports == asked &&
                a->connection.key == hub.key && !a->job_terminal && !a->link_dead &&
                !a->agent_terminating;
    if (same) {
      reuse = a;
      break;
    }
    if (a->owner == caller.user) {
      // The new kernel needs the ports now: close the listeners at once (the job abort stops the
      // agent) instead of waiting for the agent to confirm a shutdown.
      a->link->close("a new kernel of the same user takes over its hub ports");
      a->link_up = false;
      teardown(a, "a new kernel of the same user wants its ports with another key");
    }
  }
  if (!reuse) {
    for (const auto& a : allocations_) {
      if (a->releasing() || !overlaps(*a)) continue;
      // Another user's kernel is not named: its id is theirs to know (as GET says 404 for it).
      return fail(ServiceErrorKind::conflict,
                  a->owner == caller.user
                      ? "another kernel of yours already uses hub ports of this request (" +
                            a->log_id + "); choose other ports"
                      : std::string("hub ports of this request are in use by another user's "
                                    "kernel; choose other ports"),
                  "connection");
    }
  }
  if (config_.max_kernels_per_user > 0 && !reuse) {
    int count = 0;
    for (const auto& [id, k] : kernels_) {
      if (k.view.owner == caller.user && live(k.view.state)) ++count;
    }
    if (count >= config_.max_kernels_per_user) {
      return fail(ServiceErrorKind::limit_exceeded,
                  "user " + caller.user + " already has " + std::to_string(count) +
                      " kernels, the bridge's max_kernels_per_user; shut one down first",
                  "", "max_kernels_per_user");
    }
  }

  std::string id = kb::auth::to_hex(kb::auth::random_bytes(6));
  Kernel k;
  k.view.id = id;
  k.view.owner = caller.user;
  k.view.site = site->name;
  k.view.name = request.name;
  k.view.tags = request.tags;
  k.view.kernel_argv = request.kernel_argv;
  k.view.kernel_name = request.kernel_name;
  k.view.resources = request.resources;
  k.view.created_at = Clock::now();
  k.view.hub_ip = hub.ip;
  k.lease = request.lease;
  k.last_watch = clock_.now();

  if (reuse) {
    reuse->grace_timer.cancel();
    reuse->kernel_id = id;
    if (auto token2 = credentials_.token(caller.user)) {
      reuse->last_credentials = unicore::Credentials::bearer(*token2);
    }
    k.alloc = reuse;
    k.view.job_id = reuse->job_id;
    k.view.job_url = reuse->job_url;
    k.view.node = reuse->node;
    std::tie(k.view.shell_port, k.view.iopub_port, k.view.stdin_port, k.view.control_port,
             k.view.hb_port) =
        std::tuple(reuse->ports[0], reuse->ports[1], reuse->ports[2], reuse->ports[3],
                   reuse->ports[4]);
    // Walltime end and restart count carry over from the kernel that used the allocation before.
    for (const auto& [oid, other] : kernels_) {
      if (other.view.job_url == reuse->job_url && !reuse->job_url.empty()) {
        k.view.walltime_end = other.view.walltime_end;
        k.view.restarts = std::max(k.view.restarts, other.view.restarts);
        k.view.link_reconnects = std::max(k.view.link_reconnects, other.view.link_reconnects);
      }
    }
    auto [it, inserted] = kernels_.emplace(id, std::move(k));
    Kernel& kernel = it->second;
    set_state(kernel, KernelState::requested);
    progress(kernel, "reusing the allocation of kernel " + reuse->log_id +
                         (reuse->job_id.empty() ? std::string()
                                                : " (job " + reuse->job_id + ")") +
                         ": no new queue wait");
    // Catch up with the allocation's phase.
    KernelState state = KernelState::submitted;
    if (reuse->job_status == JobStatus::queued) state = KernelState::queued;
    if (reuse->job_status == JobStatus::running) state = KernelState::starting;
    if (reuse->phase >= AllocationPhase::connecting) state = KernelState::connecting;
    if (reuse->job_url.empty()) state = KernelState::requested;
    set_state(kernel, state);
    if (reuse->phase == AllocationPhase::serving) {
      reuse->restart_pending = true;
      reuse->kernel_running = false;
      ++kernel.view.restarts;
      progress(kernel, "starting a fresh kernel in the running job");
      reuse->link->restart();
    }
    done(kernel.view);
    return;
  }

  auto alloc = std::make_shared<Allocation>(clock_);
  alloc->log_id = id;
  alloc->owner = caller.user;
  alloc->site = site;
  alloc->backend = backend->second;
  alloc->connection = hub;
  alloc->resources = request.resources;
  alloc->kernel_id = id;
  alloc->last_credentials = unicore::Credentials::bearer(*token);

  kb::auth::LinkSecret secret = kb::auth::LinkSecret::generate();
  LinkSpec spec;
  spec.kernel_id = id;
  spec.site = site;
  spec.connection = hub;
  spec.secret = secret;
  std::weak_ptr<Allocation> weak = alloc;
  std::weak_ptr<bool> alive = alive_;
  alloc->link = links_(spec, [this, weak, alive](const LinkEvent& event) {
    if (alive.expired()) return;
    auto a = weak.lock();
    if (!a) return;
    // Events may come from inside a link call; handle them on a fresh stack.
    asio::post(io_, [this, a, event, alive] {
      if (!alive.expired()) on_link_event(a, event);
    });
  });
  try {
    alloc->ports = alloc->link->listen();
  } catch (const LinkListenError& e) {
    return fail(ServiceErrorKind::conflict,
                std::string("cannot listen on the hub-side ports: ") + e.what() +
                    "; another program uses them: choose other ports",
                "connection");
  }
  k.alloc = alloc;
  std::tie(k.view.shell_port, k.view.iopub_port, k.view.stdin_port, k.view.control_port,
           k.view.hb_port) =
      std::tuple(alloc->ports[0], alloc->ports[1], alloc->ports[2], alloc->ports[3],
                 alloc->ports[4]);
  allocations_.push_back(alloc);
  auto [it, inserted] = kernels_.emplace(id, std::move(k));
  Kernel& kernel = it->second;
  spdlog::info("[{}] kernel requested by {} ({}) on site {}: argv {}", id, caller.user,
               caller.origin, site->name, nlohmann::json(request.kernel_argv).dump());
  set_state(kernel, KernelState::requested);

  JobPlan plan;
  plan.kernel_id = id;
  plan.owner = caller.user;
  plan.site = site;
  plan.request = std::move(request);
  plan.request.connection.key.clear();  // the job never needs the Jupyter key
  plan.secret_hex = secret.hex();
  plan.agent_no_bridge_timeout = options_.agent_no_bridge_timeout;
  auto description = std::make_shared<unicore::JobDescription>(build_job_description(plan));
  done(kernel.view);

  asio::post(io_, [this, alloc, description, alive] {
    if (alive.expired() || alloc->releasing()) return;
    auto creds = credentials_for(*alloc);
    alloc->backend->submit(creds, *description, [this, alloc, alive](unicore::Result<std::string> r) {
      if (alive.expired() || alloc->releasing()) {
        // Shut down while submitting: the job must not stay behind.
        if (!alive.expired() && r) {
          alloc->job_url = r.value();
          alloc->backend->abort(credentials_for(*alloc), r.value(), [](auto) {});
        }
        return;
      }
      if (!r) return fail_unicore(alloc, r.error(), "submitting the kernel's job");
      note_site(alloc->site->name, "unicore", true, "");
      alloc->job_url = r.value();
      alloc->job_id = last_segment(alloc->job_url);
      alloc->working_dir = alloc->backend->working_directory(alloc->job_url, nullptr);
      alloc->set_phase(AllocationPhase::submitted);
      if (Kernel* k = attached(alloc)) {
        k->view.job_id = alloc->job_id;
        k->view.job_url = alloc->job_url;
        set_state(*k, KernelState::submitted);
        progress(*k, "job " + alloc->job_id + " submitted to site " + alloc->site->name);
      }
      if (alloc->site->agent.mode == AgentConfig::Mode::upload) {
        upload_agent(alloc);
      } else {
        watch(alloc);
      }
    });
  });
}

std::vector<KernelView> KernelLifecycle::list() const {
  std::vector<KernelView> out;
  out.reserve(kernels_.size());
  for (const auto& [id, k] : kernels_) out.push_back(k.view);
  return out;
}

std::optional<KernelView> KernelLifecycle::get(std::string_view id) const {
  const Kernel* k = find(id);
  if (!k) return std::nullopt;
  return k->view;
}

void KernelLifecycle::interrupt(const Caller& caller, std::string_view id, ActionCallback done) {
  Kernel* k = find(id);
  if (!k) return done(ServiceError{ServiceErrorKind::not_found, "no kernel " + std::string(id), "id", ""});
  if (!live(k->view.state) || !k->alloc || k->alloc->phase != AllocationPhase::serving) {
    return done(ServiceError{ServiceErrorKind::conflict,
                             "kernel " + k->view.id + " is " + std::string(to_string(k->view.state)) +
                                 ": there is no running kernel to interrupt",
                             "", ""});
  }
  spdlog::info("[{}] interrupt requested by {}", k->view.id, caller.origin);
  k->alloc->link->interrupt();
  done(std::nullopt);
}

void KernelLifecycle::restart(const Caller& caller, std::string_view id, ActionCallback done) {
  Kernel* k = find(id);
  if (!k) return done(ServiceError{ServiceErrorKind::not_found, "no kernel " + std::string(id), "id", ""});
  bool runnable = live(k->view.state) && k->alloc && k->alloc->phase == AllocationPhase::serving &&
                  (k->view.state == KernelState::ready || k->view.state == KernelState::reconnecting);
  if (!runnable) {
    return done(ServiceError{ServiceErrorKind::conflict,
                             "kernel " + k->view.id + " is " + std::string(to_string(k->view.state)) +
                                 ": only a ready (or reconnecting) kernel can be restarted",
                             "", ""});
  }
  auto alloc = k->alloc;
  alloc->restart_pending = true;
  ++k->view.restarts;
  progress(*k, "restart requested by " + caller.origin + ": a fresh kernel starts in job " +
                   alloc->job_id);
  alloc->link->restart();
  done(std::nullopt);
}

void KernelLifecycle::remove(const Caller& caller, std::string_view id, ActionCallback done) {
  Kernel* k = find(id);
  if (!k) return done(ServiceError{ServiceErrorKind::not_found, "no kernel " + std::string(id), "id", ""});
  if (!live(k->view.state)) return done(std::nullopt);  // already ended: nothing left to do
  end_kernel(*k, EndCause::shutdown, "shut down by " + caller.origin);
  done(std::nullopt);
}

std::vector<HealthCheck> KernelLifecycle::health() const {
  std::vector<HealthCheck> out;
  for (const auto& [site, checks] : site_health_) {
    for (const auto& [component, check] : checks) out.push_back(check);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Ending kernels, releasing allocations

void KernelLifecycle::end_kernel(Kernel& k, EndCause cause, std::string reason,
                                 std::optional<int> code, std::optional<int> signal,
                                 bool allow_grace) {
  if (!live(k.view.state)) return;
  AllocPtr alloc = k.alloc;
  k.alloc.reset();
  k.view.end_cause = cause;
  k.view.reason = std::move(reason);
  k.view.exit_code = code;
  k.view.exit_signal = signal;
  k.ended_at = clock_.now();
  if (alloc) {
    sample_traffic(*alloc);
    alloc->kernel_id.clear();
  }
  spdlog::info("[{}] ended ({}): {}", k.view.id, to_string(cause), k.view.reason);
  set_state(k, KernelState::ended);
  if (!alloc) return;
  bool usable = !alloc->releasing() && !alloc->job_terminal && !alloc->link_dead &&
                !alloc->agent_terminating && !alloc->job_url.empty();
  if (allow_grace && !shutting_down_ && usable && options_.restart_grace.count() > 0 &&
      (cause == EndCause::shutdown || cause == EndCause::kernel_exited)) {
    park(alloc);
  } else {
    teardown(alloc, "kernel " + k.view.id + " ended (" + std::string(to_string(cause)) + ")");
  }
}

void KernelLifecycle::end_attached(const AllocPtr& alloc, EndCause cause, std::string reason) {
  if (Kernel* k = attached(alloc)) {
    end_kernel(*k, cause, std::move(reason), {}, {}, false);
  } else {
    teardown(alloc, reason);
  }
}

void KernelLifecycle::park(const AllocPtr& alloc) {
  spdlog::info("[{}] allocation (job {}) kept for {} s for a restart with the same connection",
               alloc->log_id, alloc->job_id, options_.restart_grace.count());
  std::weak_ptr<Allocation> weak = alloc;
  std::weak_ptr<bool> alive = alive_;
  alloc->grace_timer.wait(options_.restart_grace, [this, weak, alive] {
    if (alive.expired()) return;
    auto a = weak.lock();
    if (!a || !a->kernel_id.empty()) return;
    teardown(a, "no kernel reused it within the restart grace");
  });
}

void KernelLifecycle::teardown(const AllocPtr& alloc, const std::string& why) {
  if (alloc->releasing()) return;
  alloc->set_phase(AllocationPhase::releasing);
  spdlog::info("[{}] releasing the allocation{}: {}", alloc->log_id,
               alloc->job_id.empty() ? std::string() : " (job " + alloc->job_id + ")", why);
  if (Kernel* k = attached(alloc)) {
    // Cannot happen through end_kernel (it detaches first); a safety net for a kernel left behind.
    end_kernel(*k, EndCause::internal, "its allocation was released: " + why, {}, {}, false);
  }
  alloc->discovery_timer.cancel();
  alloc->connect_timer.cancel();
  alloc->grace_timer.cancel();
  alloc->rewatch_timer.cancel();
  std::weak_ptr<bool> alive = alive_;
  auto finish = [this, alloc, alive] {
    if (alive.expired()) return;
    if (alloc->link) alloc->link->close("the kernel's allocation was released");
    if (alloc->job_url.empty() || alloc->job_terminal) {
      forget(alloc);
      return;
    }
    alloc->set_phase(AllocationPhase::aborting);
    alloc->backend->abort(credentials_for(*alloc), alloc->job_url,
                          [this, alloc, alive](unicore::Result<unicore::Done> r) {
                            if (alive.expired()) return;
                            if (!r && r.error().kind != unicore::ErrorKind::not_found) {
                              spdlog::error("[{}] could not abort job {} on site {}: {} — abort it "
                                            "by hand (kernel-bridge unicore abort {})",
                                            alloc->log_id, alloc->job_id, alloc->site->name,
                                            r.error().message, alloc->job_url);
                              note_site(alloc->site->name, "unicore", false, r.error().message);
                            } else {
                              spdlog::info("[{}] job {} aborted", alloc->log_id, alloc->job_id);
                            }
                            forget(alloc);
                          });
  };
  // An agent that can be reached stops its kernel and exits cleanly; then the job is aborted to be
  // sure nothing keeps running (also when the agent cannot be reached).
  if (alloc->link && alloc->link_up && !alloc->job_terminal) {
    alloc->link->shutdown([this, alive, finish] {
      if (alive.expired()) return;
      asio::post(io_, finish);
    });
  } else {
    finish();
  }
}

void KernelLifecycle::forget(const AllocPtr& alloc) {
  if (alloc->watcher) alloc->watcher->stop();
  sample_traffic(*alloc);
  alloc->link.reset();
  allocations_.erase(std::remove(allocations_.begin(), allocations_.end(), alloc),
                     allocations_.end());
  if (shutting_down_ && allocations_.empty() && shutdown_done_) {
    auto done = std::move(shutdown_done_);
    shutdown_done_ = nullptr;
    if (shutdown_timer_) shutdown_timer_->cancel();
    done();
  }
}

void KernelLifecycle::fail_unicore(const AllocPtr& alloc, const unicore::UnicoreError& error,
                                   const std::string& doing) {
  const std::string& site = alloc->site->name;
  note_site(site, "unicore", error.kind == unicore::ErrorKind::refused, error.message);
  switch (error.kind) {
    case unicore::ErrorKind::refused:
      return end_attached(alloc, EndCause::credentials_refused,
                          "site " + site + " refused the UNICORE credentials of user " +
                              alloc->owner + " while " + doing + ": " + error.message +
                              ". Log in to JupyterHub again so it pushes a fresh token.");
    case unicore::ErrorKind::submission_disabled:
      return end_attached(alloc, EndCause::submit_failed,
                          "site " + site + " does not accept jobs now: " +
                              (error.server_message.empty() ? error.message : error.server_message) +
                              ". Try again later.");
    default:
      return end_attached(alloc, alloc->job_url.empty() ? EndCause::submit_failed : EndCause::internal,
                          "error while " + doing + " at site " + site + ": " + error.message);
  }
}

// ------------------------------------------------------------------------------------------------
// The job: stage-in, watching, discovery

void KernelLifecycle::upload_agent(const AllocPtr& alloc) {
  auto bytes = options_.agent_uploads.find(alloc->site->name);
  if (bytes == options_.agent_uploads.end() || !bytes->second) {
    return end_attached(alloc, EndCause::internal,
                        "site " + alloc->site->name +
                            " uploads the agent but the bridge has no agent executable loaded");
  }
  progress(alloc, "uploading the agent (" + std::to_string(bytes->second->size()) +
                      " bytes) into job " + alloc->job_id);
  std::weak_ptr<bool> alive = alive_;
  alloc->backend->upload(credentials_for(*alloc), alloc->working_dir, kUploadedAgentFile,
                         *bytes->second, [this, alloc, alive](unicore::Result<unicore::Done> r) {
                           if (alive.expired() || alloc->releasing()) return;
                           if (!r) return fail_unicore(alloc, r.error(), "uploading the agent");
                           start_job(alloc);
                         });
}

void KernelLifecycle::start_job(const AllocPtr& alloc) {
  std::weak_ptr<bool> alive = alive_;
  alloc->backend->start(credentials_for(*alloc), alloc->job_url,
                        [this, alloc, alive](unicore::Result<unicore::Done> r) {
                          if (alive.expired() || alloc->releasing()) return;
                          if (!r) return fail_unicore(alloc, r.error(), "starting the job");
                          watch(alloc);
                        });
}

void KernelLifecycle::watch(const AllocPtr& alloc) {
  std::weak_ptr<Allocation> weak = alloc;
  std::weak_ptr<bool> alive = alive_;
  auto poll = [this, weak, alive](std::function<void(unicore::Result<unicore::JobInfo>)> reply) {
    auto a = weak.lock();
    if (!a || alive.expired()) return;
    a->backend->get_job(credentials_for(*a), a->job_url, std::move(reply));
  };
  unicore::WatchHandlers handlers;
  handlers.on_change = [this, weak, alive](const unicore::JobInfo& info) {
    auto a = weak.lock();
    if (a && !alive.expired()) on_job_change(a, info);
  };
  handlers.on_end = [this, weak, alive](const unicore::JobInfo& info) {
    auto a = weak.lock();
    if (a && !alive.expired()) on_job_end(a, info);
  };
  handlers.on_error = [this, weak, alive](const unicore::UnicoreError& e, bool fatal) {
    auto a = weak.lock();
    if (a && !alive.expired()) on_job_error(a, e, fatal);
  };
  if (alloc->watcher) alloc->watcher->stop();
  alloc->watcher = unicore::JobWatcher::create(std::move(poll), clock_.make_timer(),
                                               std::move(handlers), options_.watch);
  alloc->watcher->start();
}

void KernelLifecycle::on_job_change(const AllocPtr& alloc, const unicore::JobInfo& info) {
  note_site(alloc->site->name, "unicore", true, "");
  token_accepted(alloc, alloc->refused_watches, "following job " + alloc->job_id + " again");
  auto previous = alloc->job_status;
  alloc->job_status = info.status;
  if (!info.queue.empty()) alloc->queue = info.queue;
  if (alloc->releasing()) return;
  Kernel* k = attached(alloc);
  switch (info.status) {
    case JobStatus::queued:
      if (previous != JobStatus::queued && k) {
        if (k->view.state == KernelState::requested || k->view.state == KernelState::submitted) {
          set_state(*k, KernelState::queued);
        }
        std::string queue = !alloc->queue.empty() ? alloc->queue
                            : alloc->resources.queue ? *alloc->resources.queue
                                                      : std::string("the site's default queue");
        progress(*k, "job " + alloc->job_id + " queued in " + queue +
                         (info.batch_system_id.empty() || info.batch_system_id == "N/A"
                              ? std::string()
                              : " (batch job " + info.batch_system_id + ")"));
      }
      break;
    case JobStatus::running:
      if (previous != JobStatus::running) on_running(alloc, info);
      break;
    default:
      if (k && previous != info.status) {
        progress(*k, "job " + alloc->job_id + " is " + unicore::to_string(info.status));
      }
      break;
  }
}

void KernelLifecycle::on_running(const AllocPtr& alloc, const unicore::JobInfo& info) {
  alloc->set_phase(AllocationPhase::discovering);
  alloc->running_since = clock_.now();
  if (alloc->working_dir.empty() || !info.working_directory.empty()) {
    alloc->working_dir = alloc->backend->working_directory(alloc->job_url, &info);
  }
  if (Kernel* k = attached(alloc)) {
    if (alloc->resources.runtime) {
      k->view.walltime_end = Clock::now() + *alloc->resources.runtime;
    }
    if (k->view.state < KernelState::starting) set_state(*k, KernelState::starting);
    progress(*k, "job " + alloc->job_id + " running; waiting for the agent");
  }
  std::weak_ptr<bool> alive = alive_;
  alloc->backend->get_details(credentials_for(*alloc), alloc->job_url,
                              [this, alloc, alive](unicore::Result<unicore::JobDetails> r) {
                                if (alive.expired() || alloc->releasing()) return;
                                if (!r || !r->available) return;  // the discovery file names it too
                                std::string node = !r->nodes.empty() ? r->nodes.front() : r->batch_host;
                                if (node.empty()) return;
                                alloc->node = node;
                                if (Kernel* k = attached(alloc)) {
                                  k->view.node = node;
                                  progress(*k, "running on " + node);
                                }
                              });
  alloc->discovery_delay = options_.discovery_initial;
  poll_discovery(alloc);
}

void KernelLifecycle::poll_discovery(const AllocPtr& alloc) {
  // From connecting on, the agent is known (or the allocation is being released).
  if (alloc->phase >= AllocationPhase::connecting || alloc->job_terminal) return;
  std::weak_ptr<bool> alive = alive_;
  alloc->backend->download(
      credentials_for(*alloc), alloc->working_dir, kDiscoveryFile,
      [this, alloc, alive](unicore::Result<std::string> r) {
        if (alive.expired() || alloc->phase >= AllocationPhase::connecting || alloc->job_terminal) {
          return;
        }
        if (!r && r.error().kind == unicore::ErrorKind::refused) {
          return discovery_refused(alloc, r.error());
        }
        // Only an answer that needed the token says it is accepted again (not, say, a 503).
        if (r || r.error().kind == unicore::ErrorKind::not_found) {
          token_accepted(alloc, alloc->refused_discovery,
                         "looking for the agent of job " + alloc->job_id);
        }
        if (r) return on_discovery(alloc, r.value());
        if (r.error().kind != unicore::ErrorKind::not_found) {
          spdlog::warn("[{}] reading {}: {}", alloc->log_id, kDiscoveryFile, r.error().message);
        }
        retry_discovery(alloc);
      });
}

void KernelLifecycle::retry_discovery(const AllocPtr& alloc) {
  if (clock_.now() - alloc->running_since > options_.discovery_timeout) {
    return end_attached(alloc, EndCause::link_failed,
                        "the agent did not write its discovery file (" + std::string(kDiscoveryFile) +
                            ") within " + std::to_string(options_.discovery_timeout.count()) +
                            " s after job " + alloc->job_id +
                            " started; read the job's stderr in its working directory (" +
                            alloc->working_dir + ") and check the site's agent setting");
  }
  const auto delay = alloc->discovery_delay;
  alloc->discovery_delay =
      std::min(options_.discovery_max,
               std::chrono::milliseconds(alloc->discovery_delay.count() * 3 / 2 + 1));
  poll_discovery_after(alloc, delay);
}

void KernelLifecycle::poll_discovery_after(const AllocPtr& alloc, std::chrono::milliseconds delay) {
  std::weak_ptr<Allocation> weak = alloc;
  std::weak_ptr<bool> alive = alive_;
  alloc->discovery_timer.wait(delay, [this, weak, alive] {
    if (alive.expired()) return;
    if (auto a = weak.lock()) poll_discovery(a);
  });
}

// The user's token expired between the job starting and the agent being found. The job runs
// regardless, so this is not the end yet: like watching, the read is tried again with whatever token
// JupyterHub pushes meanwhile — but only until the discovery timeout, because without the file the
// bridge cannot tell a working agent from a broken one. Then the kernel ends as credentials_refused
// (the agent, never reached, ends the job itself after its no-bridge time).
void KernelLifecycle::discovery_refused(const AllocPtr& alloc, const unicore::UnicoreError& error) {
  const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
      clock_.now() - alloc->running_since);
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                        options_.discovery_timeout) - elapsed;
  const std::string situation = "the bridge looked for the agent of job " + alloc->job_id;
  if (left <= std::chrono::milliseconds(0)) {
    ++alloc->refused_discovery;
    note_site(alloc->site->name, "unicore", false, error.message);
    return end_attached(alloc, EndCause::credentials_refused,
                        "site " + alloc->site->name + " refused the UNICORE credentials of user " +
                            alloc->owner + " while " + situation + " (" +
                            std::to_string(alloc->refused_discovery) + " reads of " +
                            kDiscoveryFile + " refused, the last one: " + error.message +
                            "). Log in to JupyterHub again so it pushes a fresh token.");
  }
  const auto delay = token_refused(
      alloc, alloc->refused_discovery, error, situation,
      "the job runs, but the kernel cannot be reached until JupyterHub pushes a fresh token (log in "
      "again within " +
          std::to_string(std::chrono::duration_cast<std::chrono::seconds>(left).count()) + " s)",
      left);
  poll_discovery_after(alloc, delay);
}

// A call made with the user's token was refused; `refusals` counts them in a row for one purpose
// (watching, discovery). Records it, tells the user once, and returns the wait before the next try
// with whatever token the hub pushes meanwhile: 15 s, doubling up to 5 min (LifecycleOptions), and
// never more than `cap`.
std::chrono::milliseconds KernelLifecycle::token_refused(const AllocPtr& alloc, int& refusals,
                                                         const unicore::UnicoreError& error,
                                                         const std::string& situation,
                                                         const std::string& consequence,
                                                         std::chrono::milliseconds cap) {
  ++refusals;
  const auto delay = std::min<std::chrono::milliseconds>(
      {options_.rewatch_max, cap,
       options_.rewatch_initial * (1LL << std::min(refusals - 1, 10))});
  note_site(alloc->site->name, "unicore", false, error.message);
  spdlog::warn("[{}] site {} refused the credentials of user {} while {}: {}; trying again in {} ms",
               alloc->log_id, alloc->site->name, alloc->owner, situation, error.message,
               delay.count());
  if (refusals == 1) {
    progress(alloc, "site " + alloc->site->name + " refused the UNICORE token of user " +
                        alloc->owner + " while " + situation + ": " + consequence);
  }
  return delay;
}

// The first call accepted after refusals: say so, and start counting afresh.
void KernelLifecycle::token_accepted(const AllocPtr& alloc, int& refusals,
                                     const std::string& resuming) {
  if (refusals == 0) return;
  refusals = 0;
  note_site(alloc->site->name, "unicore", true, "");
  progress(alloc, "site " + alloc->site->name + " accepts the token of user " + alloc->owner +
                      " again: " + resuming);
}

void KernelLifecycle::on_discovery(const AllocPtr& alloc, const std::string& bytes) {
  AgentAddress agent;
  std::string problem;
  try {
    auto j = nlohmann::json::parse(bytes);
    if (!j.is_object()) throw std::runtime_error("not a JSON object");
    agent.host = j.at("host").get<std::string>();
    auto port = j.at("port").get<long long>();
    if (port <= 0 || port > 65535) throw std::runtime_error("port out of range");
    agent.port = static_cast<std::uint16_t>(port);
    if (j.contains("hostname") && j["hostname"].is_string()) agent.hostname = j["hostname"];
    if (agent.host.empty()) throw std::runtime_error("empty host");
  } catch (const std::exception& e) {
    problem = e.what();
  }
  if (!problem.empty()) {
    // Written atomically by the agent, so this is not a partial write: say so, and keep trying
    // (a restarted agent rewrites it) until the discovery timeout.
    spdlog::warn("[{}] {} in job {} is not usable ({}); trying again", alloc->log_id,
                 kDiscoveryFile, alloc->job_id, problem);
    return retry_discovery(alloc);
  }
  alloc->agent = agent;
  alloc->set_phase(AllocationPhase::connecting);
  if (alloc->node.empty() && !agent.hostname.empty()) alloc->node = agent.hostname;
  if (Kernel* k = attached(alloc)) {
    if (k->view.node.empty()) k->view.node = alloc->node;
    set_state(*k, KernelState::connecting);
    progress(*k, "connecting to agent at " + agent.host + ":" + std::to_string(agent.port) +
                     " via " + alloc->link->login_host());
  }
  std::weak_ptr<Allocation> weak = alloc;
  std::weak_ptr<bool> alive = alive_;
  alloc->connect_timer.wait(options_.connect_timeout, [this, weak, alive] {
    if (alive.expired()) return;
    auto a = weak.lock();
    if (!a || a->phase >= AllocationPhase::serving) return;  // a kernel started, or released
    end_attached(a, EndCause::link_failed,
                 "could not reach the agent of job " + a->job_id + " within " +
                     std::to_string(options_.connect_timeout.count()) + " s via " +
                     a->link->login_host() +
                     (a->last_link_error.empty() ? std::string() : ": " + a->last_link_error));
  });
  alloc->link->connect(agent);
}

void KernelLifecycle::on_job_error(const AllocPtr& alloc, const unicore::UnicoreError& error,
                                   bool fatal) {
  if (alloc->releasing()) return;
  if (!fatal) {
    note_site(alloc->site->name, "unicore", false, error.message);
    spdlog::warn("[{}] polling job {}: {} (trying again)", alloc->log_id, alloc->job_id,
                 error.message);
    return;
  }
  if (error.kind == unicore::ErrorKind::refused && !alloc->job_url.empty()) {
    // The token the job was submitted with has expired (OIDC access tokens live minutes to hours;
    // a notebook session lives longer). The kernel does not need UNICORE to keep running — the
    // link to the agent is separate — so it is not ended: watching pauses and is tried again with
    // whatever token the hub has pushed meanwhile. The agent still reports the job's end (SIGTERM
    // at walltime) through the link.
    const auto delay = token_refused(
        alloc, alloc->refused_watches, error, "following job " + alloc->job_id,
        "the kernel keeps running, but the bridge cannot see the job's status until JupyterHub "
        "pushes a fresh token (log in again)");
    std::weak_ptr<bool> alive = alive_;
    alloc->rewatch_timer.wait(delay, [this, alloc, alive] {
      if (alive.expired() || alloc->releasing() || alloc->job_terminal) return;
      watch(alloc);
    });
    return;
  }
  if (error.kind == unicore::ErrorKind::not_found) {
    alloc->job_terminal = true;
    return end_attached(alloc, EndCause::cancelled,
                        "job " + alloc->job_id + " no longer exists on site " + alloc->site->name +
                            " (deleted outside the bridge)");
  }
  fail_unicore(alloc, error, "watching the job");
}

void KernelLifecycle::on_job_end(const AllocPtr& alloc, const unicore::JobInfo& info) {
  alloc->job_terminal = true;
  alloc->job_status = info.status;
  alloc->discovery_timer.cancel();
  alloc->connect_timer.cancel();
  spdlog::info("[{}] job {} ended {}: {}", alloc->log_id, alloc->job_id,
               unicore::to_string(info.status), info.status_message);
  Kernel* k = attached(alloc);
  if (!k) {
    teardown(alloc, std::string("its job ended (") + unicore::to_string(info.status) + ")");
    return;
  }
  std::string message = info.failure_reason();
  EndCause cause;
  std::string reason;
  if (info.status == JobStatus::failed && is_walltime_message(message)) {
    cause = EndCause::walltime;
    reason = "walltime reached: job " + alloc->job_id + " hit its time limit" +
             (alloc->resources.runtime ? " (" + format_duration(*alloc->resources.runtime) + ")"
                                       : std::string()) +
             ". The site says: " + message +
             " Start a new kernel (ask for a longer runtime if the site's limits allow).";
  } else if (info.status == JobStatus::failed && alloc->phase != AllocationPhase::aborting &&
             is_cancel_message(message)) {
    cause = EndCause::cancelled;
    reason = "job " + alloc->job_id + " was cancelled outside the bridge: " + message;
  } else if (info.status == JobStatus::failed) {
    cause = EndCause::job_failed;
    reason = message;
  } else {
    cause = EndCause::job_failed;
    reason = "job " + alloc->job_id + " ended (" + unicore::to_string(info.status) +
             ") while its kernel was still in use" +
             (message.empty() ? std::string() : ": " + message);
  }
  end_kernel(*k, cause, reason, {}, {}, false);
}

// ------------------------------------------------------------------------------------------------
// The link

void KernelLifecycle::on_link_event(const AllocPtr& alloc, const LinkEvent& event) {
  namespace hub_event = tunnel::hub_event;
  Kernel* k = attached(alloc);
  std::visit(
      kb::Overloaded{
          [](const hub_event::Listening&) {},
          [&](const hub_event::LinkUp&) {
            alloc->link_up = true;
            note_site(alloc->site->name, "ssh", true, "");
            if (alloc->ever_up) {
              if (metrics_) metrics_->link_reconnects.with({alloc->site->name}).inc();
              if (k) {
                ++k->view.link_reconnects;
                progress(*k, "link to the agent re-established");
              }
            } else if (k) {
              progress(*k, "link to the agent is up; the kernel is starting");
            }
            alloc->ever_up = true;
            if (k && alloc->kernel_running &&
                (k->view.state == KernelState::reconnecting ||
                 k->view.state == KernelState::connecting)) {
              set_state(*k, KernelState::ready);
            }
          },
          [&](const hub_event::LinkDown& down) {
            alloc->link_up = false;
            alloc->last_link_error = down.reason;
            if (alloc->releasing()) return;
            if (k && k->view.state == KernelState::ready) {
              set_state(*k, KernelState::reconnecting);
            }
            if (k) progress(*k, "link to the agent lost (" + down.reason + "); reconnecting");
          },
          [&](const hub_event::KernelStarted& started) {
            bool was_restart = alloc->restart_pending || started.restart;
            alloc->restart_pending = false;
            alloc->kernel_running = true;
            alloc->set_phase(AllocationPhase::serving);
            alloc->connect_timer.cancel();
            if (!k) return;
            progress(*k, std::string(was_restart ? "kernel restarted" : "kernel started") +
                             " (pid " + std::to_string(started.pid) + ") on " +
                             (alloc->node.empty() ? std::string("the compute node") : alloc->node));
            if (alloc->link_up) set_state(*k, KernelState::ready);
          },
          [&](const hub_event::KernelExited& exited) {
            alloc->kernel_running = false;
            // Signal names are for people; the view keeps the number.
            std::string signal =
                exited.signal ? tunnel::ProcessExit::signal_name(*exited.signal) : std::string();
            std::string how = exited.code ? "with code " + std::to_string(*exited.code)
                              : exited.signal ? "by " + signal
                                              : std::string("");
            if (alloc->restart_pending) {
              if (k) {
                progress(*k, "the previous kernel exited (" + how + "); the new one is starting");
              }
              return;
            }
            if (alloc->agent_terminating || alloc->releasing()) return;  // the job's end says why
            if (!k) return;
            std::string reason = "the kernel exited " + how;
            if (exited.signal && !exited.code) reason = "the kernel was killed by " + signal;
            if (exited.code && *exited.code != 0) {
              reason += "; its output is in job " + alloc->job_id + "'s stderr";
            }
            end_kernel(*k, EndCause::kernel_exited, reason, exited.code, exited.signal);
          },
          [&](const hub_event::AgentTerminating& terminating) {
            alloc->agent_terminating = true;
            if (k) progress(*k, "the agent is terminating: " + terminating.reason);
            // The job's final status says why (walltime, cancelled): ask now rather than at the
            // next poll.
            if (!alloc->job_terminal && alloc->watcher) watch(alloc);
          },
          [&](const SshRefused& refused) {
            alloc->link_dead = true;
            alloc->last_link_error = refused.message;
            note_site(alloc->site->name, "ssh", false, refused.message);
            switch (refused.cause) {
              case SshRefused::Cause::host_key_mismatch:
                return end_attached(
                    alloc, EndCause::host_key_mismatch,
                    refused.message +
                        ". The login host's key does not match the site's known_hosts (" +
                        alloc->site->known_hosts +
                        "): ask the site for its host key fingerprint and update the file; nothing "
                        "was sent over the refused connection.");
              case SshRefused::Cause::identity_refused:
                return end_attached(
                    alloc, EndCause::link_failed,
                    refused.message + ". Check the site's ssh_user and ssh_identity.");
            }
          },
          [&](const hub_event::Error& error) {
            alloc->last_link_error = error.message;
            if (k) progress(*k, error.message);
          },
          [&](const hub_event::Closed& closed) {
            alloc->link_up = false;
            alloc->link_dead = true;
            if (alloc->releasing() || !k) return;
            if (alloc->agent_terminating || alloc->job_terminal) {
              if (!alloc->job_terminal && alloc->watcher) watch(alloc);  // its end says why
              return;
            }
            end_attached(alloc, EndCause::link_failed,
                         "the link to the agent closed: " + closed.reason);
          },
      },
      event);
}

// ------------------------------------------------------------------------------------------------
// Housekeeping

void KernelLifecycle::sample_traffic(Allocation& alloc) {
  if (!metrics_ || !alloc.link) return;
  LinkTraffic now = alloc.link->traffic();
  for (std::size_t i = 0; i < tunnel::kChannelKinds; ++i) {
    const char* channel = tunnel::to_string(tunnel::kAllChannelKinds[i]);
    if (now.to_kernel[i] > alloc.sampled.to_kernel[i]) {
      metrics_->channel_bytes.with({channel, "to_kernel"})
          .inc(static_cast<double>(now.to_kernel[i] - alloc.sampled.to_kernel[i]));
    }
    if (now.from_kernel[i] > alloc.sampled.from_kernel[i]) {
      metrics_->channel_bytes.with({channel, "from_kernel"})
          .inc(static_cast<double>(now.from_kernel[i] - alloc.sampled.from_kernel[i]));
    }
  }
  alloc.sampled = now;
}

void KernelLifecycle::watched(std::string_view id) {
  if (Kernel* k = find(id)) k->last_watch = clock_.now();
}

void KernelLifecycle::expire_leases() {
  const auto now = clock_.now();
  std::vector<std::string> expired;
  for (const auto& [id, k] : kernels_) {
    if (live(k.view.state) && k.lease.count() > 0 && now - k.last_watch > k.lease) {
      expired.push_back(id);
    }
  }
  for (const auto& id : expired) {
    Kernel* k = find(id);
    if (!k) continue;
    const auto silent = std::chrono::duration_cast<std::chrono::seconds>(now - k->last_watch);
    spdlog::warn("[{}] its front end (owner {}) has not asked for it for {} s (lease {} s): shutting "
                 "it down",
                 id, k->view.owner, silent.count(), k->lease.count());
    // Like the wrapper's own DELETE: the allocation is parked for the restart grace, so a Jupyter
    // restart that killed the old wrapper still gets the running job.
    end_kernel(*k, EndCause::shutdown,
               "no status request from its front end for " + std::to_string(silent.count()) +
                   " s (lease " + std::to_string(k->lease.count()) +
                   " s): the kernelspec wrapper was killed or its host went away, so the kernel "
                   "was shut down");
  }
}

void KernelLifecycle::tick() {
  for (auto& alloc : allocations_) sample_traffic(*alloc);
  expire_leases();
  auto now = clock_.now();
  bool pruned = false;
  for (auto it = kernels_.begin(); it != kernels_.end();) {
    if (!live(it->second.view.state) && now - it->second.ended_at > options_.ended_retention) {
      it = kernels_.erase(it);
      pruned = true;
    } else {
      ++it;
    }
  }
  if (pruned) update_state_gauges();
  std::weak_ptr<bool> alive = alive_;
  tick_timer_.wait(options_.tick, [this, alive] {
    if (!alive.expired()) tick();
  });
}

void KernelLifecycle::shutdown(std::function<void()> done) {
  shutting_down_ = true;
  shutdown_done_ = std::move(done);
  spdlog::info("shutting down: {} kernel allocation(s) to release", allocations_.size());
  std::vector<std::string> ids;
  for (auto& [id, k] : kernels_) {
    if (live(k.view.state)) ids.push_back(id);
  }
  for (const auto& id : ids) {
    if (Kernel* k = find(id)) {
      end_kernel(*k, EndCause::shutdown,
                 "the bridge was stopped; the kernel and its job were shut down", {}, {}, false);
    }
  }
  for (const auto& alloc : std::vector<AllocPtr>(allocations_)) {
    teardown(alloc, "the bridge is shutting down");
  }
  if (allocations_.empty()) {
    auto d = std::move(shutdown_done_);
    shutdown_done_ = nullptr;
    if (d) d();
    return;
  }
  shutdown_timer_ = clock_.make_timer();
  std::weak_ptr<bool> alive = alive_;
  shutdown_timer_->wait(options_.shutdown_timeout, [this, alive] {
    if (alive.expired() || !shutdown_done_) return;
    for (const auto& a : allocations_) {
      spdlog::error("[{}] job {} on site {} did not confirm its end within {} s; check it "
                    "(kernel-bridge unicore status {})",
                    a->log_id, a->job_id, a->site->name, options_.shutdown_timeout.count(),
                    a->job_url);
    }
    auto d = std::move(shutdown_done_);
    shutdown_done_ = nullptr;
    d();
  });
}

}  // namespace kb::bridge
