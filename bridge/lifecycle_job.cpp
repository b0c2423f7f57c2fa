// The job side of the kernel lifecycle: submitting the job, the agent's stage-in and the job's
// start, watching the job, finding the agent through its discovery file (also with a refused
// token), the job's end, and what a failed UNICORE call ends a kernel with.
#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include <algorithm>
#include <cctype>

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
  return url.substr(slash == std::string::npos ? 0 : slash + 1,
                    end - (slash == std::string::npos ? 0 : slash + 1) + 1);
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool contains(const std::string& haystack, const char* needle) {
  return lower(haystack).find(needle) != std::string::npos;
}

bool is_walltime_message(const std::string& message) {
  return contains(message, "time limit") || contains(message, "timeout") ||
         contains(message, "walltime") || contains(message, "wall time");
}

bool is_cancel_message(const std::string& message) {
  return contains(message, "abort") || contains(message, "cancel");
}

}  // namespace

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
      return end_attached(
          alloc, EndCause::submit_failed,
          "site " + site + " does not accept jobs now: " +
              (error.server_message.empty() ? error.message : error.server_message) +
              ". Try again later.");
    default:
      return end_attached(alloc,
                          alloc->job_url.empty() ? EndCause::submit_failed : EndCause::internal,
                          "error while " + doing + " at site " + site + ": " + error.message);
  }
}

// ------------------------------------------------------------------------------------------------
// The job: submission, stage-in, watching, discovery

// Submits a new allocation's job on a fresh stack (create has answered by then); the agent's
// upload, if the site wants one, and the watching follow.
void KernelLifecycle::submit(const AllocPtr& alloc,
                             std::shared_ptr<const unicore::JobDescription> description) {
  std::weak_ptr<bool> alive = alive_;
  asio::post(io_, [this, alloc, description, alive] {
    if (alive.expired() || alloc->releasing()) return;
    auto creds = credentials_for(*alloc);
    alloc->backend->submit(
        creds, *description, [this, alloc, alive](unicore::Result<std::string> r) {
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
        std::string queue = !alloc->queue.empty()    ? alloc->queue
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
                                std::string node =
                                    !r->nodes.empty() ? r->nodes.front() : r->batch_host;
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
    return end_attached(
        alloc, EndCause::link_failed,
        "the agent did not write its discovery file (" + std::string(kDiscoveryFile) + ") within " +
            std::to_string(options_.discovery_timeout.count()) + " s after job " + alloc->job_id +
            " started; read the job's stderr in its working directory (" + alloc->working_dir +
            ") and check the site's agent setting");
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
// regardless, so this is not the end yet: like watching, the read is tried again with whatever
// token JupyterHub pushes meanwhile — but only until the discovery timeout, because without the
// file the bridge cannot tell a working agent from a broken one. Then the kernel ends as
// credentials_refused (the agent, never reached, ends the job itself after its no-bridge time).
void KernelLifecycle::discovery_refused(const AllocPtr& alloc, const unicore::UnicoreError& error) {
  const auto elapsed =
      std::chrono::duration_cast<std::chrono::milliseconds>(clock_.now() - alloc->running_since);
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(options_.discovery_timeout) - elapsed;
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
      "the job runs, but the kernel cannot be reached until JupyterHub pushes a fresh token (log "
      "in again within " +
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
      {options_.rewatch_max, cap, options_.rewatch_initial * (1LL << std::min(refusals - 1, 10))});
  note_site(alloc->site->name, "unicore", false, error.message);
  spdlog::warn(
      "[{}] site {} refused the credentials of user {} while {}: {}; trying again in {} ms",
      alloc->log_id, alloc->site->name, alloc->owner, situation, error.message, delay.count());
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

}  // namespace kb::bridge
