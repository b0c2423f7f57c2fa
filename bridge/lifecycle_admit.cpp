// Admitting a kernel (KernelLifecycle::create): the request is checked (site, argv, token, hub
// ports, the per-user limit), then the kernel either reuses the parked allocation a Jupyter restart
// asks for again, or gets a new allocation whose job is submitted to UNICORE.
#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "auth/secret.hpp"
#include "bridge/lifecycle.hpp"
#include "bridge/lifecycle_state.hpp"

namespace kb::bridge {

namespace asio = boost::asio;
using unicore::JobStatus;

namespace {

std::string last_segment(const std::string& url) {
  auto end = url.find_last_not_of('/');
  if (end == std::string::npos) return url;
  auto slash = url.rfind('/', end);
  return url.substr(slash == std::string::npos ? 0 : slash + 1, end - (slash == std::string::npos ? 0 : slash + 1) + 1);
}

}  // namespace

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

}  // namespace kb::bridge
