// The link side of the kernel lifecycle: what the hub-side link reports (up, down, kernel started
// or exited, agent terminating, SSH refused, closed) turned into kernel states, progress lines and
// ends, and the link's traffic counted into the metrics.
#include <spdlog/spdlog.h>
#include <boost/asio/post.hpp>

#include "bridge/lifecycle.hpp"
#include "bridge/lifecycle_state.hpp"
#include "bridge/metrics.hpp"
#include "common/overloaded.hpp"
#include "link/process_exit.hpp"
#include "link/session.hpp"

namespace kb::bridge {

namespace asio = boost::asio;

// ------------------------------------------------------------------------------------------------
// The link

// The hub-side link of a new allocation. Its events come back to on_link_event, each on a fresh
// stack, as long as the allocation and the lifecycle live.
std::unique_ptr<KernelLink> KernelLifecycle::open_link(const AllocPtr& alloc,
                                                       const LinkSpec& spec) {
  std::weak_ptr<Allocation> weak = alloc;
  std::weak_ptr<bool> alive = alive_;
  return links_(spec, [this, weak, alive](const LinkEvent& event) {
    if (alive.expired()) return;
    auto a = weak.lock();
    if (!a) return;
    // Events may come from inside a link call; handle them on a fresh stack.
    asio::post(io_, [this, a, event, alive] {
      if (!alive.expired()) on_link_event(a, event);
    });
  });
}

void KernelLifecycle::on_link_event(const AllocPtr& alloc, const LinkEvent& event) {
  namespace hub_event = tunnel::hub_event;
  if (detached_) return;  // the bridge stops and keeps its kernels: links closing are expected
  Kernel* k = attached(alloc);
  std::visit(
      kb::Overloaded{
          [](const hub_event::Listening&) {},
          [&](const hub_event::LinkUp&) { on_link_up(alloc, k); },
          [&](const hub_event::LinkDown& down) { on_link_down(alloc, k, down); },
          [&](const hub_event::KernelStarted& started) { on_kernel_started(alloc, k, started); },
          [&](const hub_event::KernelExited& exited) { on_kernel_exited(alloc, k, exited); },
          [&](const hub_event::AgentTerminating& terminating) {
            on_agent_terminating(alloc, k, terminating);
          },
          [&](const SshRefused& refused) { on_ssh_refused(alloc, refused); },
          [&](const hub_event::Error& error) {
            alloc->last_link_error = error.message;
            if (k) progress(*k, error.message);
          },
          [&](const hub_event::Closed& closed) { on_link_closed(alloc, k, closed); },
      },
      event);
}

void KernelLifecycle::on_link_up(const AllocPtr& alloc, Kernel* k) {
  alloc->link_up = true;
  note_site(alloc->site->name, "ssh", true, "");
  if (alloc->ever_up) {
    if (metrics_) metrics_->link_reconnects.with({alloc->site->name}).inc();
    if (k) {
      ++k->view.link_reconnects;
      progress(*k, "link to the agent re-established");
    }
  } else if (alloc->handed_over) {
    // The session the previous process handed over resumed: the kernel runs, nothing was lost.
    alloc->reattached = false;
    alloc->set_phase(AllocationPhase::serving);
    alloc->connect_timer.cancel();
    if (k)
      progress(*k, "re-attached: the link session resumed, the kernel runs on " +
                       (alloc->node.empty() ? std::string("the compute node") : alloc->node));
  } else if (k) {
    progress(*k, alloc->reattached ? "link to the agent is up again; asking it what runs"
                                   : "link to the agent is up; the kernel is starting");
  }
  alloc->ever_up = true;
  if (k && alloc->kernel_running &&
      (k->view.state == KernelState::reconnecting || k->view.state == KernelState::connecting)) {
    set_state(*k, KernelState::ready);
  }
}

void KernelLifecycle::on_link_down(const AllocPtr& alloc, Kernel* k,
                                   const tunnel::hub_event::LinkDown& down) {
  alloc->link_up = false;
  alloc->last_link_error = down.reason;
  if (alloc->releasing()) return;
  if (k && k->view.state == KernelState::ready) {
    set_state(*k, KernelState::reconnecting);
  }
  if (k) progress(*k, "link to the agent lost (" + down.reason + "); reconnecting");
}

void KernelLifecycle::on_kernel_started(const AllocPtr& alloc, Kernel* k,
                                        const tunnel::hub_event::KernelStarted& started) {
  bool was_restart = alloc->restart_pending || started.restart;
  alloc->restart_pending = false;
  alloc->kernel_running = true;
  alloc->set_phase(AllocationPhase::serving);
  alloc->connect_timer.cancel();
  const bool reattached = std::exchange(alloc->reattached, false);
  if (!k) return;
  const std::string where = alloc->node.empty() ? std::string("the compute node") : alloc->node;
  if (reattached && !was_restart) {
    progress(*k, "re-attached: the kernel (pid " + std::to_string(started.pid) +
                     ") is running on " + where);
  } else {
    progress(*k, std::string(was_restart ? "kernel restarted" : "kernel started") + " (pid " +
                     std::to_string(started.pid) + ") on " + where);
  }
  if (alloc->link_up) set_state(*k, KernelState::ready);
}

void KernelLifecycle::on_kernel_exited(const AllocPtr& alloc, Kernel* k,
                                       const tunnel::hub_event::KernelExited& exited) {
  alloc->kernel_running = false;
  // Signal names are for people; the view keeps the number.
  std::string signal =
      exited.signal ? tunnel::ProcessExit::signal_name(*exited.signal) : std::string();
  std::string how = exited.code     ? "with code " + std::to_string(*exited.code)
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
}

void KernelLifecycle::on_agent_terminating(const AllocPtr& alloc, Kernel* k,
                                           const tunnel::hub_event::AgentTerminating& terminating) {
  alloc->agent_terminating = true;
  if (k) progress(*k, "the agent is terminating: " + terminating.reason);
  // The job's final status says why (walltime, cancelled): ask now rather than at the
  // next poll.
  if (!alloc->job_terminal && alloc->watcher) watch(alloc);
}

void KernelLifecycle::on_ssh_refused(const AllocPtr& alloc, const SshRefused& refused) {
  alloc->link_dead = true;
  alloc->last_link_error = refused.message;
  note_site(alloc->site->name, "ssh", false, refused.message);
  switch (refused.cause) {
    case SshRefused::Cause::host_key_mismatch:
      return end_attached(
          alloc, EndCause::host_key_mismatch,
          refused.message + ". The login host's key does not match the site's known_hosts (" +
              alloc->site->known_hosts +
              "): ask the site for its host key fingerprint and update the file; nothing "
              "was sent over the refused connection.");
    case SshRefused::Cause::identity_refused:
      return end_attached(alloc, EndCause::link_failed,
                          refused.message + ". Check the site's ssh_user and ssh_identity.");
  }
}

void KernelLifecycle::on_link_closed(const AllocPtr& alloc, Kernel* k,
                                     const tunnel::hub_event::Closed& closed) {
  alloc->link_up = false;
  alloc->link_dead = true;
  if (alloc->releasing() || !k) return;
  if (alloc->agent_terminating || alloc->job_terminal) {
    if (!alloc->job_terminal && alloc->watcher) watch(alloc);  // its end says why
    return;
  }
  end_attached(alloc, EndCause::link_failed, "the link to the agent closed: " + closed.reason);
}

// The link's traffic since the last sample, into the channel byte counters.
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

}  // namespace kb::bridge
