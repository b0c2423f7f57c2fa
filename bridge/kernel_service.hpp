#pragma once
// KernelService: the seam between the control API (bridge/control_api) and the kernel lifecycle.
// The API authenticates the caller, parses and validates the request (site known, resources within
// the site's limits, defaults applied), checks ownership, and only then calls the service. The
// lifecycle implements the service; tests use an in-memory fake (tests/bridge/fake_kernel_service).
//
// Threading: every method is called on the io_context thread, and every callback and listener is
// invoked on that same thread. A callback may be invoked inline (before the method returns) or
// later; callers must cope with both. Nothing here may block.
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace kb::bridge {

using Clock = std::chrono::system_clock;

// requested → submitted → queued → starting → connecting → ready ⇄ reconnecting → ended(reason).
// `reconnecting` is not death: a client polling during an outage must keep the kernel alive.
enum class KernelState {
  requested,
  submitted,
  queued,
  starting,
  connecting,
  ready,
  reconnecting,
  ended
};
inline constexpr KernelState kAllKernelStates[] = {
    KernelState::requested,    KernelState::submitted,  KernelState::queued,
    KernelState::starting,     KernelState::connecting, KernelState::ready,
    KernelState::reconnecting, KernelState::ended};

// Whether a kernel has not ended yet.
inline bool live(KernelState s) {
  return s != KernelState::ended;
}

inline std::string_view to_string(KernelState state) {
  switch (state) {
    case KernelState::requested:
      return "requested";
    case KernelState::submitted:
      return "submitted";
    case KernelState::queued:
      return "queued";
    case KernelState::starting:
      return "starting";
    case KernelState::connecting:
      return "connecting";
    case KernelState::ready:
      return "ready";
    case KernelState::reconnecting:
      return "reconnecting";
    case KernelState::ended:
      return "ended";
  }
  return "unknown";
}

inline std::optional<KernelState> kernel_state_from_string(std::string_view text) {
  for (auto state : kAllKernelStates) {
    if (to_string(state) == text) return state;
  }
  return std::nullopt;
}

// Why a kernel ended, for programs (the wrapper's exit status, metrics). `KernelView::reason` holds
// the sentence a person reads.
enum class EndCause {
  none,                 // not ended
  shutdown,             // orderly shutdown asked for (DELETE, wrapper SIGTERM)
  cancelled,            // the job was aborted outside the bridge (operator, scheduler)
  job_failed,           // the job failed; reason carries UNICORE's statusMessage
  walltime,             // the allocation's walltime was reached
  kernel_exited,        // the kernel process exited by itself (exit_code / exit_signal set)
  credentials_refused,  // UNICORE refused the user's token, or none was pushed
  host_key_mismatch,    // the login node's SSH host key did not match known_hosts
  submit_failed,        // UNICORE unreachable or refused the job description
  link_failed,          // the link to the agent could not be (re-)established in time
  internal,             // a bug or an unexpected condition in the bridge
};

inline std::string_view to_string(EndCause cause) {
  switch (cause) {
    case EndCause::none:
      return "none";
    case EndCause::shutdown:
      return "shutdown";
    case EndCause::cancelled:
      return "cancelled";
    case EndCause::job_failed:
      return "job_failed";
    case EndCause::walltime:
      return "walltime";
    case EndCause::kernel_exited:
      return "kernel_exited";
    case EndCause::credentials_refused:
      return "credentials_refused";
    case EndCause::host_key_mismatch:
      return "host_key_mismatch";
    case EndCause::submit_failed:
      return "submit_failed";
    case EndCause::link_failed:
      return "link_failed";
    case EndCause::internal:
      return "internal";
  }
  return "unknown";
}

inline constexpr EndCause kAllEndCauses[] = {EndCause::none,
                                             EndCause::shutdown,
                                             EndCause::cancelled,
                                             EndCause::job_failed,
                                             EndCause::walltime,
                                             EndCause::kernel_exited,
                                             EndCause::credentials_refused,
                                             EndCause::host_key_mismatch,
                                             EndCause::submit_failed,
                                             EndCause::link_failed,
                                             EndCause::internal};

inline std::optional<EndCause> end_cause_from_string(std::string_view text) {
  for (auto cause : kAllEndCauses) {
    if (to_string(cause) == text) return cause;
  }
  return std::nullopt;
}

// Who calls. Filled by the control API from SO_PEERCRED (Unix socket) or the bearer token (TCP).
struct Caller {
  std::string user;       // the kernels' owner this request acts for
  bool admin = false;     // the credential has the admin right (may act for any user)
  bool sees_all = false;  // an admin not acting for a user: the operator's view of every kernel
  std::string origin;     // for logs only, e.g. "unix uid 1000" or "tcp token of hub"
};

// Resources of a kernel's job. In a KernelRequest the API has already applied the site's defaults
// and checked its limits, so every value present is allowed; absent values are left to the site.
struct ResourceRequest {
  std::optional<std::string> queue;  // UNICORE "Queue" (Slurm partition)
  std::optional<int> nodes;
  std::optional<int> gpus;  // per node
  std::optional<std::chrono::seconds> runtime;
  std::optional<std::string> project;  // UNICORE "Project" (accounting)
  std::optional<std::string> reservation;
  std::optional<std::string> qos;
  std::optional<std::uint64_t> memory;  // bytes per node
};

// The hub-side endpoints Jupyter chose (its connection file). The bridge listens on exactly these,
// so clients connect unchanged, also after a restart.
struct HubConnection {
  std::string transport = "tcp";  // "tcp" only for now
  std::string ip = "127.0.0.1";
  std::uint16_t shell_port = 0;
  std::uint16_t iopub_port = 0;
  std::uint16_t stdin_port = 0;
  std::uint16_t control_port = 0;
  std::uint16_t hb_port = 0;
  std::string key;  // Jupyter HMAC key: secret, never logged, never in a view
  std::string signature_scheme = "hmac-sha256";
};

struct KernelRequest {
  std::string site;  // a configured [[site]] name (checked by the API)
  // The kernel's command line on the compute node; contains "{connection_file}", which the agent
  // replaces. Always set: a kernel name in the API request is resolved from the site's
  // [site.kernels].
  std::vector<std::string> kernel_argv;
  std::string kernel_name;  // the [site.kernels] entry used, empty for a raw argv
  ResourceRequest resources;
  HubConnection connection;
  std::string name;                         // optional label chosen by the client
  std::map<std::string, std::string> tags;  // optional client labels (also put on the job)
  // 0: none. Otherwise the client promises to ask for the kernel (GET /v1/kernels/{id}, which calls
  // KernelService::watched) at least this often; after this long without it, the service shuts the
  // kernel down as if the client had asked — a front end killed without a word (the kernelspec
  // wrapper under SIGKILL, a lost hub) must not leave a job burning compute hours.
  std::chrono::seconds lease{0};
};

struct StateChange {
  KernelState state;
  Clock::time_point at;
};

struct ProgressLine {
  Clock::time_point at;
  std::string message;  // e.g. "job 1a2b queued in batch (position 3)"; no secrets
};

// What the API shows of a kernel. Contains no secret (no HMAC key, no link secret, no token).
struct KernelView {
  std::string id;  // bridge-chosen, URL-safe
  std::string owner;
  std::string site;
  std::string name;
  std::map<std::string, std::string> tags;
  std::vector<std::string> kernel_argv;
  std::string kernel_name;
  ResourceRequest resources;  // as submitted
  KernelState state = KernelState::requested;
  EndCause end_cause = EndCause::none;
  std::string reason;              // for a person: why it ended, or what it waits for
  std::optional<int> exit_code;    // kernel_exited
  std::optional<int> exit_signal;  // kernel_exited by a signal
  std::string job_id;              // UNICORE job id, once submitted
  std::string job_url;
  std::string node;  // compute host running the agent, once known
  std::optional<Clock::time_point> walltime_end;
  std::string hub_ip;
  std::uint16_t shell_port = 0, iopub_port = 0, stdin_port = 0, control_port = 0, hb_port = 0;
  int restarts = 0;  // kernel restarts inside the allocation
  std::uint64_t link_reconnects = 0;
  Clock::time_point created_at{};
  std::vector<StateChange> history;    // every state entered, oldest first
  std::vector<ProgressLine> progress;  // bounded by the service (most recent kept)
  std::uint64_t version = 0;           // increases on every change (for long polls)
};

enum class ServiceErrorKind {
  invalid_request,      // 400: a field is wrong (field set)
  not_found,            // 404: no such kernel (also: not the caller's)
  conflict,             // 409: not possible in the kernel's state (e.g. restart an ended kernel),
                        //      or the hub ports are in use by another live kernel
  credentials_missing,  // 409: no usable UNICORE token for the user; the hub must push one
  limit_exceeded,       // 422: resources outside the site's limits (field and limit set)
  unprocessable,        // 422: well-formed but not acceptable (field set)
  unavailable,          // 503: shutting down, or a dependency is down; retry later
  internal,             // 500
};

struct ServiceError {
  ServiceErrorKind kind = ServiceErrorKind::internal;
  std::string message;  // a sentence for a person: what is wrong and what to do
  std::string field;    // request field at fault ("resources.runtime"), may be empty
  std::string limit;    // configured limit violated ("max_runtime"), limit_exceeded only
};

using CreateCallback = std::function<void(std::variant<KernelView, ServiceError>)>;
// nullopt: the action was accepted (interrupt sent, restart started, shutdown started).
using ActionCallback = std::function<void(std::optional<ServiceError>)>;
using KernelListener = std::function<void(const KernelView&)>;

// One line of /v1/health.
struct HealthCheck {
  std::string component;  // e.g. "site demo: unicore", "site demo: ssh login1.example.org:22"
  bool ok = true;
  std::string detail;  // what is wrong and what to do, when !ok
};

// What the site itself says a user may choose (GET /v1/sites/{site}/options adds the site's
// configured partitions, limits and kernels): the projects (UNICORE's groups = budgets) and the
// queues UNICORE publishes. Empty lists with a `note` when the site could not be asked.
struct UserSiteChoices {
  std::vector<std::string> projects;
  std::string default_project;
  std::vector<std::string> queues;  // empty when the site does not publish them
  std::string note;                 // why projects are missing, for people
  Clock::time_point fetched_at{};
};
using ChoicesCallback = std::function<void(UserSiteChoices)>;

class KernelService {
 public:
  virtual ~KernelService() = default;

  // Accepts a kernel (state `requested`) and calls `done` with its view once it has an id; the
  // kernel then moves on by itself. Fails with conflict when another live kernel of the same owner
  // holds the same hub ports — unless that kernel is in its restart grace period, in which case the
  // service reuses its allocation (the Jupyter restart case) and may return that kernel's id.
  virtual void create(const Caller& caller, KernelRequest request, CreateCallback done) = 0;

  // Every kernel the service knows, including ended ones it still remembers. Ownership filtering is
  // the API's job (one place, tested), so these take no caller.
  virtual std::vector<KernelView> list() const = 0;
  virtual std::optional<KernelView> get(std::string_view id) const = 0;

  // The API has checked that `caller` may act on `id`; `caller` is for logs and attribution.
  virtual void interrupt(const Caller& caller, std::string_view id, ActionCallback done) = 0;
  virtual void restart(const Caller& caller, std::string_view id, ActionCallback done) = 0;
  // Orderly shutdown: kernel, agent and job end; the view stays listed as ended for a while.
  virtual void remove(const Caller& caller, std::string_view id, ActionCallback done) = 0;

  // The kernel's owner asked for it (GET /v1/kernels/{id}; also when a long poll ends): renews the
  // kernel's lease, if it has one. Unknown ids are ignored.
  virtual void watched(std::string_view id) { (void)id; }

  // What site `site` says `caller.user` may choose, from a short-lived cache or asked now with the
  // user's UNICORE token. Never fails: a missing token or an unreachable site is a `note`.
  virtual void user_choices(const Caller& caller, const std::string& site, ChoicesCallback done) {
    (void)caller;
    (void)site;
    done(UserSiteChoices{{}, {}, {}, "this bridge cannot ask sites for choices", Clock::now()});
  }
  // The projects of the last answer within the cache's lifetime, if any (a request naming another
  // is refused before a job is submitted).
  virtual std::optional<std::vector<std::string>> known_projects(const std::string& user,
                                                                 const std::string& site) const {
    (void)user;
    (void)site;
    return std::nullopt;
  }

  // Components the service depends on (per site: UNICORE, SSH), for GET /v1/health.
  virtual std::vector<HealthCheck> health() const = 0;

  // Listeners are told after every change of any kernel (state, progress, node, …). The API uses
  // this for long polls; implementations call notify_changed() after each change.
  std::uint64_t subscribe(KernelListener listener) {
    const std::uint64_t token = ++last_listener_;
    listeners_.emplace(token, std::move(listener));
    return token;
  }
  void unsubscribe(std::uint64_t token) { listeners_.erase(token); }

 protected:
  void notify_changed(const KernelView& view) {
    // A listener may unsubscribe itself (or others) while being called: iterate over a snapshot.
    std::vector<std::uint64_t> tokens;
    tokens.reserve(listeners_.size());
    for (const auto& entry : listeners_) tokens.push_back(entry.first);
    for (auto token : tokens) {
      auto it = listeners_.find(token);
      if (it != listeners_.end()) {
        auto listener = it->second;  // copy: the call may erase the entry
        listener(view);
      }
    }
  }

 private:
  std::map<std::uint64_t, KernelListener> listeners_;
  std::uint64_t last_listener_ = 0;
};

}  // namespace kb::bridge
