// Admitting a kernel (KernelLifecycle::create): the request is checked (site, argv, token, hub
// ports, the per-user limit), then the kernel either reuses the parked allocation a Jupyter restart
// asks for again, or gets a new allocation whose job is submitted to UNICORE.
#include <spdlog/spdlog.h>

#include <algorithm>

#include "auth/secret.hpp"
#include "bridge/lifecycle.hpp"
#include "bridge/lifecycle_state.hpp"

namespace kb::bridge {

using unicore::JobStatus;

namespace {

// Whether an allocation listening on `held_ports` of `held` has one of the ports `hub` asks for.
bool overlaps(const HubConnection& held, const std::array<std::uint16_t, 5>& held_ports,
              const HubConnection& hub) {
  if (held.ip != hub.ip) return false;
  for (auto p : hub_ports(hub)) {
    if (p == 0) continue;
    for (auto q : held_ports) {
      if (p == q) return true;
    }
  }
  return false;
}

}  // namespace

void KernelLifecycle::create(const Caller& caller, KernelRequest request, CreateCallback done) {
  auto admitted = admit(caller, request);
  if (auto* refused = std::get_if<ServiceError>(&admitted)) return done(std::move(*refused));
  const Admission& admission = std::get<Admission>(admitted);
  Kernel k = new_kernel(caller, *admission.site, request);
  if (admission.reuse) return reuse_allocation(admission.reuse, std::move(k), caller.user, done);
  start_allocation(admission, std::move(k), caller, std::move(request), done);
}

std::variant<KernelLifecycle::Admission, ServiceError> KernelLifecycle::admit(
    const Caller& caller, const KernelRequest& request) {
  auto refuse = [](ServiceErrorKind kind, std::string message, std::string field = {}) {
    return ServiceError{kind, std::move(message), std::move(field), {}};
  };
  if (shutting_down_) {
    return refuse(ServiceErrorKind::unavailable,
                  "the bridge is shutting down; start the kernel again once it is back");
  }
  const SiteConfig* site = config_.find_site(request.site);
  auto backend = backends_.find(request.site);
  if (!site || backend == backends_.end()) {
    return refuse(ServiceErrorKind::invalid_request, "unknown site '" + request.site + "'", "site");
  }
  if (request.kernel_argv.empty()) {
    return refuse(ServiceErrorKind::invalid_request, "the kernel's argv is empty", "kernel_argv");
  }
  auto token = credentials_.token(caller.user);
  if (!token) {
    auto info = credentials_.info(caller.user);
    return refuse(ServiceErrorKind::credentials_missing,
                  std::string("no ") +
                      (info.status == auth::CredentialsStore::Status::expired ? "unexpired " : "") +
                      "UNICORE token for user " + caller.user +
                      ": the hub pushes it (PUT /v1/users/" + caller.user +
                      "/credentials) when you log in; log in to JupyterHub again, or push one");
  }
  Admission admission{site, backend->second, *token,
                      take_over_ports(caller.user, site, request.connection)};
  if (!admission.reuse) {
    if (auto refused = refuse_ports(caller.user, request.connection)) return *refused;
    if (auto refused = refuse_over_limit(caller.user)) return *refused;
  }
  return admission;
}

// A Jupyter restart: the same owner asks again for the same endpoints and key within the grace.
KernelLifecycle::AllocPtr KernelLifecycle::take_over_ports(const std::string& user,
                                                           const SiteConfig* site,
                                                           const HubConnection& hub) {
  for (const auto& a : std::vector<AllocPtr>(allocations_)) {
    if (a->releasing() || !a->kernel_id.empty() || !overlaps(a->connection, a->ports, hub)) {
      continue;
    }
    bool same = a->owner == user && a->site == site && a->ports == hub_ports(hub) &&
                a->connection.key == hub.key && !a->job_terminal && !a->link_dead &&
                !a->agent_terminating;
    if (same) return a;
    if (a->owner == user) {
      // The new kernel needs the ports now: close the listeners at once (the job abort stops the
      // agent) instead of waiting for the agent to confirm a shutdown.
      a->link->close("a new kernel of the same user takes over its hub ports");
      a->link_up = false;
      teardown(a, "a new kernel of the same user wants its ports with another key");
    }
  }
  return nullptr;
}

std::optional<ServiceError> KernelLifecycle::refuse_ports(const std::string& user,
                                                          const HubConnection& hub) const {
  for (const auto& a : allocations_) {
    if (a->releasing() || !overlaps(a->connection, a->ports, hub)) continue;
    // Another user's kernel is not named: its id is theirs to know (as GET says 404 for it).
    return ServiceError{ServiceErrorKind::conflict,
                        a->owner == user
                            ? "another kernel of yours already uses hub ports of this request (" +
                                  a->log_id + "); choose other ports"
                            : std::string("hub ports of this request are in use by another "
                                          "user's kernel; choose other ports"),
                        "connection", ""};
  }
  return std::nullopt;
}

std::optional<ServiceError> KernelLifecycle::refuse_over_limit(const std::string& user) const {
  if (config_.max_kernels_per_user <= 0) return std::nullopt;
  int count = 0;
  for (const auto& [id, k] : kernels_) {
    if (k.view.owner == user && live(k.view.state)) ++count;
  }
  if (count < config_.max_kernels_per_user) return std::nullopt;
  return ServiceError{ServiceErrorKind::limit_exceeded,
                      "user " + user + " already has " + std::to_string(count) +
                          " kernels, the bridge's max_kernels_per_user; shut one down first",
                      "", "max_kernels_per_user"};
}

KernelLifecycle::Kernel KernelLifecycle::new_kernel(const Caller& caller, const SiteConfig& site,
                                                    const KernelRequest& request) {
  Kernel k;
  k.view.id = kb::auth::to_hex(kb::auth::random_bytes(6));
  k.view.owner = caller.user;
  k.view.site = site.name;
  k.view.name = request.name;
  k.view.tags = request.tags;
  k.view.kernel_argv = request.kernel_argv;
  k.view.kernel_name = request.kernel_name;
  k.view.resources = request.resources;
  k.view.created_at = Clock::now();
  k.view.hub_ip = request.connection.ip;
  k.lease = request.lease;
  k.last_watch = clock_.now();
  return k;
}

void KernelLifecycle::reuse_allocation(const AllocPtr& reuse, Kernel k, const std::string& user,
                                       const CreateCallback& done) {
  const std::string id = k.view.id;
  reuse->grace_timer.cancel();
  reuse->kernel_id = id;
  if (auto token = credentials_.token(user)) {
    reuse->last_credentials = unicore::Credentials::bearer(*token);
  }
  k.alloc = reuse;
  k.view.job_id = reuse->job_id;
  k.view.job_url = reuse->job_url;
  k.view.node = reuse->node;
  set_view_ports(k.view, reuse->ports);
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
                       (reuse->job_id.empty() ? std::string() : " (job " + reuse->job_id + ")") +
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
}

void KernelLifecycle::start_allocation(const Admission& admission, Kernel k, const Caller& caller,
                                       KernelRequest request, const CreateCallback& done) {
  const std::string id = k.view.id;
  const HubConnection& hub = request.connection;
  auto alloc = std::make_shared<Allocation>(clock_);
  alloc->log_id = id;
  alloc->owner = caller.user;
  alloc->site = admission.site;
  alloc->backend = admission.backend;
  alloc->connection = hub;
  alloc->resources = request.resources;
  alloc->kernel_id = id;
  alloc->last_credentials = unicore::Credentials::bearer(admission.token);

  kb::auth::LinkSecret secret = kb::auth::LinkSecret::generate();
  alloc->secret = secret;
  alloc->created_at = Clock::now();
  LinkSpec spec;
  spec.kernel_id = id;
  spec.site = admission.site;
  spec.connection = hub;
  spec.secret = secret;
  alloc->link = open_link(alloc, spec);
  try {
    alloc->ports = alloc->link->listen();
  } catch (const LinkListenError& e) {
    return done(ServiceError{ServiceErrorKind::conflict,
                             std::string("cannot listen on the hub-side ports: ") + e.what() +
                                 "; another program uses them: choose other ports",
                             "connection", ""});
  }
  k.alloc = alloc;
  set_view_ports(k.view, alloc->ports);
  allocations_.push_back(alloc);
  auto [it, inserted] = kernels_.emplace(id, std::move(k));
  Kernel& kernel = it->second;
  spdlog::info("[{}] kernel requested by {} ({}) on site {}: argv {}", id, caller.user,
               caller.origin, admission.site->name, nlohmann::json(request.kernel_argv).dump());
  set_state(kernel, KernelState::requested);

  JobPlan plan;
  plan.kernel_id = id;
  plan.owner = caller.user;
  plan.site = admission.site;
  plan.request = std::move(request);
  plan.request.connection.key.clear();  // the job never needs the Jupyter key
  plan.secret_hex = secret.hex();
  plan.agent_no_bridge_timeout = options_.agent_no_bridge_timeout;
  auto description = std::make_shared<const unicore::JobDescription>(build_job_description(plan));
  done(kernel.view);
  submit(alloc, std::move(description));
}

}  // namespace kb::bridge
