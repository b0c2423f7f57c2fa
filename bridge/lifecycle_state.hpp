#pragma once
// The kernel lifecycle's private state (bridge/lifecycle*.cpp only): an allocation (its phase, job,
// agent and link) and a kernel (its view, the allocation it is attached to). Not a public header:
// nothing outside the lifecycle's own .cpp files includes it.
#include <spdlog/spdlog.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "auth/secret.hpp"
#include "bridge/lifecycle.hpp"

namespace kb::bridge {

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

inline constexpr AllocationPhase kAllAllocationPhases[] = {
    AllocationPhase::submitting, AllocationPhase::submitted, AllocationPhase::discovering,
    AllocationPhase::connecting, AllocationPhase::serving,   AllocationPhase::releasing,
    AllocationPhase::aborting};

inline const char* to_string(AllocationPhase phase) {
  switch (phase) {
    case AllocationPhase::submitting:
      return "submitting";
    case AllocationPhase::submitted:
      return "submitted";
    case AllocationPhase::discovering:
      return "discovering";
    case AllocationPhase::connecting:
      return "connecting";
    case AllocationPhase::serving:
      return "serving";
    case AllocationPhase::releasing:
      return "releasing";
    case AllocationPhase::aborting:
      return "aborting";
  }
  return "?";
}

inline std::optional<AllocationPhase> allocation_phase_from_string(std::string_view text) {
  for (auto phase : kAllAllocationPhases) {
    if (text == to_string(phase)) return phase;
  }
  return std::nullopt;
}

// The hub-side ports in the order KernelLink::listen returns them: shell, iopub, stdin, control,
// hb. The same order as the store's records.
inline std::array<std::uint16_t, 5> hub_ports(const HubConnection& hub) {
  return {hub.shell_port, hub.iopub_port, hub.stdin_port, hub.control_port, hub.hb_port};
}
inline void set_hub_ports(HubConnection& hub, const std::array<std::uint16_t, 5>& ports) {
  std::tie(hub.shell_port, hub.iopub_port, hub.stdin_port, hub.control_port, hub.hb_port) =
      std::tuple(ports[0], ports[1], ports[2], ports[3], ports[4]);
}
inline void set_view_ports(KernelView& view, const std::array<std::uint16_t, 5>& ports) {
  std::tie(view.shell_port, view.iopub_port, view.stdin_port, view.control_port, view.hb_port) =
      std::tuple(ports[0], ports[1], ports[2], ports[3], ports[4]);
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
  kb::auth::LinkSecret secret;  // the link's; recorded in the store's secrets table for re-attach
  Clock::time_point created_at{};
  std::shared_ptr<unicore::JobWatcher> watcher;
  unicore::Credentials last_credentials;  // fallback when the store has none any more (abort)
  std::string job_url, job_id, working_dir, queue, node;
  std::optional<unicore::JobStatus> job_status;  // the last one UNICORE reported
  AgentAddress agent;                            // from the discovery file, on entering connecting
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
  // Restored from the store at start-up: the agent is asked what runs rather than to start a
  // kernel, and the job is watched again once its owner's UNICORE token is there.
  bool reattached = false;
  // Its link was handed over by the previous process: the same session resumes, the kernel runs.
  bool handed_over = false;
  // Watching the job (and reading the discovery file) waits for the owner's token: after a
  // restart the bridge has none until JupyterHub pushes one (tokens are never stored).
  bool awaiting_token = false;
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

// What admit() found for a request it accepts: the site, and the caller's token for a new job; or
// the parked allocation the request asks for again (then nothing new is made).
struct KernelLifecycle::Admission {
  const SiteConfig* site = nullptr;
  JobBackend* backend = nullptr;
  std::string token;
  AllocPtr reuse;
};

struct KernelLifecycle::Kernel {
  KernelView view;
  AllocPtr alloc;  // while attached
  // On clock_ (steady, and the tests' fake time), unlike the view's wall-clock timestamps.
  kb::Clock::time_point ended_at{};
  std::chrono::seconds lease{0};  // KernelRequest::lease
  kb::Clock::time_point last_watch{};
};

}  // namespace kb::bridge
