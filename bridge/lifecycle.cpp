// The kernel lifecycle (bridge/lifecycle.hpp): construction, the kernels' states and progress,
// the KernelService calls other than create, ending kernels and parking or releasing allocations,
// leases, the periodic tick and bridge shutdown. The other parts of the same class:
// lifecycle_admit.cpp (create), lifecycle_job.cpp (UNICORE), lifecycle_link.cpp (the link).
#include "bridge/lifecycle.hpp"

#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include <algorithm>

#include "bridge/lifecycle_state.hpp"
#include "bridge/metrics.hpp"

namespace kb::bridge {

namespace asio = boost::asio;

KernelLifecycle::KernelLifecycle(asio::io_context& io, const BridgeConfig& config,
                                 auth::CredentialsStore& credentials, BridgeMetrics* metrics,
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
    site_health_[site.name]["unicore"] = {"site " + site.name + ": unicore " + site.unicore_url,
                                          true, ""};
    std::string login = site.login_hosts.empty() ? "(none)" : site.login_hosts.front().str();
    site_health_[site.name]["ssh"] = {"site " + site.name + ": ssh " + login, true, ""};
  }
  update_state_gauges();
  tick();
}

KernelLifecycle::~KernelLifecycle() {
  *alive_ = false;
  if (credentials_subscription_) credentials_.unsubscribe(credentials_subscription_);
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
  persist(k);
  if (k.alloc) persist(*k.alloc);
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

// create(): bridge/lifecycle_admit.cpp

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
  if (!k)
    return done(
        ServiceError{ServiceErrorKind::not_found, "no kernel " + std::string(id), "id", ""});
  if (!live(k->view.state) || !k->alloc || k->alloc->phase != AllocationPhase::serving) {
    return done(ServiceError{ServiceErrorKind::conflict,
                             "kernel " + k->view.id + " is " +
                                 std::string(to_string(k->view.state)) +
                                 ": there is no running kernel to interrupt",
                             "", ""});
  }
  spdlog::info("[{}] interrupt requested by {}", k->view.id, caller.origin);
  k->alloc->link->interrupt();
  done(std::nullopt);
}

void KernelLifecycle::restart(const Caller& caller, std::string_view id, ActionCallback done) {
  Kernel* k = find(id);
  if (!k)
    return done(
        ServiceError{ServiceErrorKind::not_found, "no kernel " + std::string(id), "id", ""});
  bool runnable =
      live(k->view.state) && k->alloc && k->alloc->phase == AllocationPhase::serving &&
      (k->view.state == KernelState::ready || k->view.state == KernelState::reconnecting);
  if (!runnable) {
    return done(ServiceError{ServiceErrorKind::conflict,
                             "kernel " + k->view.id + " is " +
                                 std::string(to_string(k->view.state)) +
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
  if (!k)
    return done(
        ServiceError{ServiceErrorKind::not_found, "no kernel " + std::string(id), "id", ""});
  if (!live(k->view.state)) return done(std::nullopt);  // already ended: nothing left to do
  end_kernel(*k, EndCause::shutdown, "shut down by " + caller.origin);
  done(std::nullopt);
}

std::vector<HealthCheck> KernelLifecycle::health() const {
  std::vector<HealthCheck> out;
  for (const auto& [site, checks] : site_health_) {
    for (const auto& [component, check] : checks) out.push_back(check);
  }
  if (options_.store) {
    out.push_back({"state database " + options_.store->where(), store_ok_,
                   store_ok_ ? std::string()
                             : store_error_ + "; kernels run, but a restart could not re-attach "
                                              "them: free the disk or fix the file's rights"});
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
  persist(*alloc);
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
  persist(*alloc);
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
                              spdlog::error(
                                  "[{}] could not abort job {} on site {}: {} — abort it "
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
  unpersist(*alloc);
  allocations_.erase(std::remove(allocations_.begin(), allocations_.end(), alloc),
                     allocations_.end());
  if (shutting_down_ && allocations_.empty() && shutdown_done_) {
    auto done = std::move(shutdown_done_);
    shutdown_done_ = nullptr;
    if (shutdown_timer_) shutdown_timer_->cancel();
    done();
  }
}

// ------------------------------------------------------------------------------------------------
// Housekeeping

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
    spdlog::warn(
        "[{}] its front end (owner {}) has not asked for it for {} s (lease {} s): shutting "
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
      unpersist(it->second);
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
      spdlog::error(
          "[{}] job {} on site {} did not confirm its end within {} s; check it "
          "(kernel-bridge unicore status {})",
          a->log_id, a->job_id, a->site->name, options_.shutdown_timeout.count(), a->job_url);
    }
    auto d = std::move(shutdown_done_);
    shutdown_done_ = nullptr;
    d();
  });
}

}  // namespace kb::bridge
