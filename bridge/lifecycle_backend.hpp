#pragma once
// The two seams of the kernel lifecycle (bridge/lifecycle.hpp): how it talks to a site's UNICORE
// server (JobBackend) and how it carries a kernel's channels to its agent (KernelLink). Production
// implementations wrap unicore::UnicoreClient and tunnel::HubKernel + tunnel::SshConnectionPool;
// the lifecycle's unit tests use fakes (tests/bridge/lifecycle_test.cpp).
// Thread model: create, call and destroy everything here on the io_context's thread; every callback
// runs on that thread (possibly later, never from inside a destructor).
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>

#include "auth/secret.hpp"
#include "bridge/config.hpp"
#include "bridge/kernel_service.hpp"
#include "ssh/connection.hpp"
#include "tunnel/hub_kernel.hpp"
#include "unicore/credentials.hpp"
#include "unicore/job_description.hpp"
#include "unicore/replies.hpp"
#include "unicore/result.hpp"

namespace kb::unicore {
class UnicoreClient;
}

namespace kb::bridge {

struct BridgeMetrics;

// How the bridge logs in to one of a site's login hosts (service identity, known_hosts, cipher,
// connect timeout, keepalive). Used by the kernels' links and by `kernel-bridge doctor`.
tunnel::SshOptions site_ssh_options(const SiteConfig& site, const HostPort& login);

// One site's UNICORE server, reduced to what a kernel's job needs. Job arguments are job URLs.
// Called by KernelLifecycle on the io_context's thread; callbacks run there.
class JobBackend {
 public:
  template <class T>
  using Callback = std::function<void(unicore::Result<T>)>;
  using Credentials = unicore::Credentials;

  virtual ~JobBackend() = default;
  // The site's user info: the caller's projects (groups), the queues it publishes.
  virtual void get_core_info(const Credentials& creds, Callback<unicore::CoreInfo> done) = 0;
  virtual void submit(const Credentials& creds, const unicore::JobDescription& job,
                      Callback<std::string> done) = 0;
  virtual void start(const Credentials& creds, const std::string& job,
                     Callback<unicore::Done> done) = 0;
  virtual void get_job(const Credentials& creds, const std::string& job,
                       Callback<unicore::JobInfo> done) = 0;
  virtual void get_details(const Credentials& creds, const std::string& job,
                           Callback<unicore::JobDetails> done) = 0;
  // A small file of the job's working directory (the agent's discovery file).
  virtual void download(const Credentials& creds, const std::string& storage,
                        const std::string& path, Callback<std::string> done) = 0;
  virtual void upload(const Credentials& creds, const std::string& storage, const std::string& path,
                      std::string bytes, Callback<unicore::Done> done) = 0;
  virtual void abort(const Credentials& creds, const std::string& job,
                     Callback<unicore::Done> done) = 0;
  // The storage URL of a job's working directory.
  virtual std::string working_directory(const std::string& job_url,
                                        const unicore::JobInfo* info) const = 0;
};

// The production JobBackend: a UnicoreClient for the site, with request latency and errors counted
// in kb_unicore_request_duration_seconds / kb_unicore_request_errors_total{site}. The client is
// owned. `metrics` may be null (tests).
std::unique_ptr<JobBackend> make_unicore_backend(boost::asio::io_context& io,
                                                 const SiteConfig& site, BridgeMetrics* metrics);

// Where the agent listens, from its discovery file, and how the bridge reaches it.
struct AgentAddress {
  std::string host;  // address as seen from the login host (the direct-tcpip target)
  std::uint16_t port = 0;
  std::string hostname;  // the compute node's name (for people)
};

// The login host's key, or our identity (refused or unreadable), stopped the SSH connection:
// retrying cannot help.
struct SshRefused {
  enum class Cause { host_key_mismatch, identity_refused };
  Cause cause = Cause::identity_refused;
  std::string message;  // libssh's, naming the host (and the key's fingerprint)
};

// What a KernelLink reports: tunnel::HubKernel's events as it reports them, plus SshRefused.
using LinkEvent = std::variant<tunnel::hub_event::Listening, tunnel::hub_event::LinkUp,
                               tunnel::hub_event::LinkDown, tunnel::hub_event::KernelStarted,
                               tunnel::hub_event::KernelExited, tunnel::hub_event::AgentTerminating,
                               tunnel::hub_event::Error, tunnel::hub_event::Closed, SshRefused>;
using LinkEventSink = std::function<void(const LinkEvent& event)>;

struct LinkSpec {
  std::string kernel_id;  // for logs
  const SiteConfig* site = nullptr;
  HubConnection connection;  // hub-side endpoints and the Jupyter key
  kb::auth::LinkSecret secret;
  // Set when a previous process handed this kernel over (planned restart): listen() takes its
  // listeners and link session instead of binding new ones. Its descriptors are the link's.
  std::optional<tunnel::HubHandover> handover;
};

using HandoverDone =
    std::function<void(std::optional<tunnel::HubHandover>, const std::string& why_not)>;

// Bytes the kernel's streams carried, from the link's counters.
struct LinkTraffic {
  std::array<std::uint64_t, tunnel::kChannelKinds> to_kernel{};  // indexed by tunnel::ChannelKind
  std::array<std::uint64_t, tunnel::kChannelKinds> from_kernel{};
  std::uint64_t resumes = 0;
};

// Thrown by KernelLink::listen when the hub-side endpoints cannot be bound.
struct LinkListenError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The hub-side end of one kernel: five listeners that accept at once, and a link to the agent
// that is established once the agent's address is known and re-established after every drop.
// Called by KernelLifecycle on the io_context's thread; its events arrive there too.
class KernelLink {
 public:
  virtual ~KernelLink() = default;
  // Binds the five hub-side listeners (throws LinkListenError naming the port). Returns the bound
  // ports (shell, iopub, stdin, control, hb): those asked for, or chosen ones where 0 was asked.
  virtual std::array<std::uint16_t, 5> listen() = 0;
  // The agent is known: connect (through the site's login host) and keep connected.
  virtual void connect(const AgentAddress& agent) = 0;
  virtual void interrupt() = 0;
  virtual void restart() = 0;
  // Asks the agent to stop the kernel and exit; `done` once the link is closed (bounded wait).
  virtual void shutdown(std::function<void()> done) = 0;
  // Closes the listeners and the link now.
  virtual void close(const std::string& reason) = 0;
  // Planned restart: stop accepting, quiesce the link and hand it over
  // (tunnel::HubKernel::quiesce). On failure the link is left for close().
  virtual void quiesce(std::chrono::milliseconds timeout, HandoverDone done) = 0;
  virtual LinkTraffic traffic() const = 0;
  virtual std::string login_host() const = 0;  // "host:port" the link goes through, for people
};

using KernelLinkFactory =
    std::function<std::unique_ptr<KernelLink>(const LinkSpec& spec, LinkEventSink events)>;

// The production factory: tunnel::HubKernel whose transports are direct-tcpip channels of the
// shared SSH connection to the site's login host (from `pool`, which must outlive the links).
KernelLinkFactory make_ssh_link_factory(boost::asio::io_context& io,
                                        tunnel::SshConnectionPool& pool);

}  // namespace kb::bridge
