#pragma once
// KernelLifecycle: the bridge's KernelService. One state machine per kernel (docs/lifecycle.md):
//   requested → submitted → queued → starting → connecting → ready ⇄ reconnecting → ended(reason)
// A kernel runs in an *allocation*: its UNICORE job (whose main process is the agent), the agent's
// address from the discovery file, and the hub-side link (five listeners + the link to the agent).
// When a kernel ends by shutdown or by exiting, its allocation is parked for restart_grace, so the
// create that follows a Jupyter restart (same owner, same hub ports and key) reuses it: the agent
// starts a fresh kernel in the running job. Any other end releases the allocation at once (link
// closed, job aborted), as does the end of the grace.
// Thread model: construct, call and destroy on the io_context's thread; every callback and listener
// runs there. Nothing blocks, except the store's short local transactions (options.store).
// Every change is recorded in the store, and restore() brings kernels back after the bridge's own
// restart (docs/state.md).
// Code: lifecycle.cpp (kernels, ending them, releasing allocations, leases, shutdown),
// lifecycle_admit.cpp (create), lifecycle_job.cpp (the UNICORE job and discovery),
// lifecycle_link.cpp (the link's events), lifecycle_store.cpp (records, restore, detach); their
// shared private state is lifecycle_state.hpp.
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "auth/credentials_store.hpp"
#include "bridge/config.hpp"
#include "bridge/job_script.hpp"
#include "bridge/kernel_service.hpp"
#include "bridge/lifecycle_backend.hpp"
#include "common/clock.hpp"
#include "store/store.hpp"
#include "unicore/job_watcher.hpp"

namespace kb::bridge {

struct BridgeMetrics;

struct LifecycleOptions {
  std::chrono::seconds restart_grace{30};
  std::chrono::seconds ended_retention{3600};
  int max_kernels_per_user = 0;  // 0: unlimited
  // Discovery file polling once the job runs: first interval, growth ×1.5 up to max, and how long
  // after RUNNING the agent may take to write it.
  std::chrono::milliseconds discovery_initial{250};
  std::chrono::milliseconds discovery_max{2000};
  std::chrono::seconds discovery_timeout{180};
  // From the agent's address being known to the first kernel start through the link.
  std::chrono::seconds connect_timeout{180};
  // Agent's --no-bridge-timeout: an orphaned job ends by itself after this long without the bridge.
  std::chrono::seconds agent_no_bridge_timeout{600};
  // Bridge shutdown: how long to wait for agents and UNICORE aborts before giving up.
  std::chrono::seconds shutdown_timeout{20};
  // A job whose polls or discovery-file reads are refused (the user's token expired): first retry,
  // doubling up to.
  std::chrono::milliseconds rewatch_initial{15000};
  std::chrono::milliseconds rewatch_max{300000};
  std::chrono::milliseconds tick{5000};  // metrics sampling and pruning of ended kernels
  unicore::WatchPolicy watch;
  std::size_t max_progress = 64;
  // Per site (name): the agent executable's bytes, for sites whose agent is uploaded with the job.
  std::map<std::string, std::shared_ptr<const std::string>> agent_uploads;
  // Time for every timer, timeout, lease and grace (job polling included); must outlive the
  // lifecycle. Null: real time on the io_context. Tests pass a kb::ManualClock.
  kb::Clock* clock = nullptr;
  // Where every kernel and allocation is recorded as it changes, so that the next start re-attaches
  // (restore). Null: nothing is recorded. Must outlive the lifecycle.
  store::Store* store = nullptr;
};

// One allocation's link as a previous process handed it over (planned restart, docs/state.md).
struct HandedOver {
  std::string allocation_id;
  tunnel::HubHandover link;
};

// What restore() found in the store.
struct RestoreSummary {
  int reattaching = 0;  // kernels whose agent the bridge reconnects to
  int resumed = 0;      // kernels whose job had not started yet: watched again
  int ended = 0;        // kernels that could not be restored (reason in their view)
  int kept_ended = 0;   // kernels that had ended before, listed again until their retention
  int parked = 0;       // allocations without a kernel, kept for the restart grace
  int handed_over = 0;  // of the re-attaching: taken over from the previous process, link resumed
};

class KernelLifecycle final : public KernelService {
 public:
  // `config`, `credentials`, `metrics` (may be null) and the backends must outlive this object.
  // `backends`: one per configured site, by name.
  KernelLifecycle(boost::asio::io_context& io, const BridgeConfig& config,
                  auth::CredentialsStore& credentials, BridgeMetrics* metrics,
                  std::map<std::string, JobBackend*> backends, KernelLinkFactory links,
                  LifecycleOptions options);
  ~KernelLifecycle() override;
  KernelLifecycle(const KernelLifecycle&) = delete;
  KernelLifecycle& operator=(const KernelLifecycle&) = delete;

  void create(const Caller& caller, KernelRequest request, CreateCallback done) override;
  std::vector<KernelView> list() const override;
  std::optional<KernelView> get(std::string_view id) const override;
  void interrupt(const Caller& caller, std::string_view id, ActionCallback done) override;
  void restart(const Caller& caller, std::string_view id, ActionCallback done) override;
  void remove(const Caller& caller, std::string_view id, ActionCallback done) override;
  void watched(std::string_view id) override;
  std::vector<HealthCheck> health() const override;
  void user_choices(const Caller& caller, const std::string& site, ChoicesCallback done) override;
  std::optional<std::vector<std::string>> known_projects(const std::string& user,
                                                         const std::string& site) const override;

  // Bridge shutdown: refuses new kernels, ends every kernel (reason: the bridge stopped), asks
  // every agent to stop its kernel and aborts every job; `done` once all have answered or after
  // options.shutdown_timeout.
  void shutdown(std::function<void()> done);

  // Start-up, before the control API serves: every allocation and kernel the store recorded comes
  // back. The hub-side endpoints listen on the same ports, the link reconnects to the same agent
  // (which kept the kernel) and the job is watched again once its owner's token is pushed.
  // Throws store::StoreError for a record it cannot read (serve then refuses to start).
  // `handed_over`: links the previous process handed over (planned restart): those kernels take
  // them (listeners, client connections, the same link session) instead of listening anew;
  // descriptors of one without a live allocation in the store are closed.
  RestoreSummary restore(const store::Snapshot& snapshot, std::vector<HandedOver> handed_over = {});

  // Bridge stop that keeps the kernels (bridge.on_stop = "keep-kernels"): refuses new kernels,
  // records every kernel and allocation as they are, and closes every link; agents keep their
  // kernels for the next bridge. No kernel is ended, no job aborted.
  void detach();
  // Planned restart: detach(), but first every link is quiesced (nothing in flight either way)
  // and handed over; `done` gets those that could be (a link that could not — e.g. down with
  // frames unacknowledged — is closed as detach() closes it, and re-attaches with a new session).
  void hand_over(std::chrono::milliseconds timeout,
                 std::function<void(std::vector<HandedOver>)> done);

  std::size_t live_allocations() const { return allocations_.size(); }

 private:
  struct Allocation;
  struct Kernel;
  struct Admission;
  using AllocPtr = std::shared_ptr<Allocation>;

  // Kernels (lifecycle.cpp)
  Kernel* find(std::string_view id);
  const Kernel* find(std::string_view id) const;
  Kernel* attached(const AllocPtr& alloc);
  void set_state(Kernel& k, KernelState state);
  void progress(Kernel& k, std::string message);
  void progress(const AllocPtr& alloc, std::string message);
  void changed(Kernel& k);
  void end_kernel(Kernel& k, EndCause cause, std::string reason, std::optional<int> code = {},
                  std::optional<int> signal = {}, bool allow_grace = true);
  void end_attached(const AllocPtr& alloc, EndCause cause, std::string reason);
  void update_state_gauges();
  // Shuts down every live kernel whose lease (KernelRequest::lease) ran out; runs on every tick.
  void expire_leases();

  // Admission, create's steps (lifecycle_admit.cpp): checks the request; finds the parked
  // allocation a Jupyter restart asks for again (releasing the same user's allocations on those
  // ports with another key); refuses ports in use and a user over the limit; makes the kernel; and
  // attaches it to the reused allocation, or starts a new one.
  std::variant<Admission, ServiceError> admit(const Caller& caller, const KernelRequest& request);
  AllocPtr take_over_ports(const std::string& user, const SiteConfig* site,
                           const HubConnection& hub);
  std::optional<ServiceError> refuse_ports(const std::string& user, const HubConnection& hub) const;
  std::optional<ServiceError> refuse_over_limit(const std::string& user) const;
  Kernel new_kernel(const Caller& caller, const SiteConfig& site, const KernelRequest& request);
  void reuse_allocation(const AllocPtr& reuse, Kernel k, const std::string& user,
                        const CreateCallback& done);
  void start_allocation(const Admission& admission, Kernel k, const Caller& caller,
                        KernelRequest request, const CreateCallback& done);

  // The job (lifecycle_job.cpp): submission, stage-in, watching, discovery, the job's end.
  void submit(const AllocPtr& alloc, std::shared_ptr<const unicore::JobDescription> description);
  void upload_agent(const AllocPtr& alloc);
  void start_job(const AllocPtr& alloc);
  void watch(const AllocPtr& alloc);
  void on_job_change(const AllocPtr& alloc, const unicore::JobInfo& info);
  void on_job_end(const AllocPtr& alloc, const unicore::JobInfo& info);
  void on_job_error(const AllocPtr& alloc, const unicore::UnicoreError& error, bool fatal);
  void on_running(const AllocPtr& alloc, const unicore::JobInfo& info);
  void poll_discovery(const AllocPtr& alloc);
  void retry_discovery(const AllocPtr& alloc);
  void poll_discovery_after(const AllocPtr& alloc, std::chrono::milliseconds delay);
  void discovery_refused(const AllocPtr& alloc, const unicore::UnicoreError& error);
  std::chrono::milliseconds token_refused(
      const AllocPtr& alloc, int& refusals, const unicore::UnicoreError& error,
      const std::string& situation, const std::string& consequence,
      std::chrono::milliseconds cap = std::chrono::milliseconds::max());
  void token_accepted(const AllocPtr& alloc, int& refusals, const std::string& resuming);
  void on_discovery(const AllocPtr& alloc, const std::string& bytes);
  void fail_unicore(const AllocPtr& alloc, const unicore::UnicoreError& error,
                    const std::string& doing);

  // The link (lifecycle_link.cpp): one handler per event; `k` is the attached kernel, if any.
  std::unique_ptr<KernelLink> open_link(const AllocPtr& alloc, const LinkSpec& spec);
  void on_link_event(const AllocPtr& alloc, const LinkEvent& event);
  void on_link_up(const AllocPtr& alloc, Kernel* k);
  void on_link_down(const AllocPtr& alloc, Kernel* k, const tunnel::hub_event::LinkDown& down);
  void on_kernel_started(const AllocPtr& alloc, Kernel* k,
                         const tunnel::hub_event::KernelStarted& started);
  void on_kernel_exited(const AllocPtr& alloc, Kernel* k,
                        const tunnel::hub_event::KernelExited& exited);
  void on_agent_terminating(const AllocPtr& alloc, Kernel* k,
                            const tunnel::hub_event::AgentTerminating& terminating);
  void on_ssh_refused(const AllocPtr& alloc, const SshRefused& refused);
  void on_link_closed(const AllocPtr& alloc, Kernel* k, const tunnel::hub_event::Closed& closed);
  void sample_traffic(Allocation& alloc);

  // The store (lifecycle_store.cpp): records from kernels and allocations and back.
  void persist(const Kernel& k);
  void persist(const Allocation& alloc);
  void unpersist(const Allocation& alloc);
  void unpersist(const Kernel& k);
  template <class F>
  void with_store(const std::string& what, F&& write);
  AllocPtr read_allocation(const store::AllocationRecord& record);
  void restore_kernel(const store::KernelRecord& record, KernelView view, const AllocPtr& alloc,
                      RestoreSummary& summary);
  void reattach(const AllocPtr& alloc, Kernel* k, std::optional<tunnel::HubHandover> handover);
  static void close_handover(const tunnel::HubHandover& handover);
  void resume_job(const AllocPtr& alloc);
  void on_credentials(const std::string& user);

  // Allocations (lifecycle.cpp)
  unicore::Credentials credentials_for(const Allocation& alloc);
  void park(const AllocPtr& alloc);
  void teardown(const AllocPtr& alloc, const std::string& why);
  void forget(const AllocPtr& alloc);
  void note_site(const std::string& site, const std::string& component, bool ok,
                 const std::string& detail);
  void tick();

  boost::asio::io_context& io_;
  const BridgeConfig& config_;
  auth::CredentialsStore& credentials_;
  BridgeMetrics* metrics_;
  std::map<std::string, JobBackend*> backends_;
  KernelLinkFactory links_;
  LifecycleOptions options_;
  std::map<std::string, Kernel, std::less<>> kernels_;
  std::vector<AllocPtr> allocations_;  // attached, parked, or being torn down
  std::map<std::string, std::map<std::string, HealthCheck>> site_health_;
  std::unique_ptr<kb::Clock> real_clock_;  // when options_.clock is null
  kb::Clock& clock_;
  kb::ClockTimer tick_timer_;
  bool shutting_down_ = false;
  // user_choices' answers by user + "\n" + site (lifecycle_choices.cpp).
  std::map<std::string, UserSiteChoices> choices_;
  bool detached_ = false;    // detach(): events of the closing links are ignored
  bool store_ok_ = true;     // the last write to the store succeeded
  std::string store_error_;  // why it did not, for /v1/health
  std::uint64_t credentials_subscription_ = 0;
  std::function<void()> shutdown_done_;
  std::unique_ptr<kb::Timer> shutdown_timer_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kb::bridge
