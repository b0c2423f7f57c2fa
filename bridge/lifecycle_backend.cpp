#include "bridge/lifecycle_backend.hpp"

#include <spdlog/spdlog.h>

#include <chrono>

#include "bridge/metrics.hpp"
#include "link/connection_file.hpp"
#include "ssh/connection.hpp"
#include "tunnel/hub_kernel.hpp"
#include "unicore/client.hpp"

namespace kb::bridge {

tunnel::SshOptions site_ssh_options(const SiteConfig& site, const HostPort& login) {
  tunnel::SshOptions o;
  o.host = login.host;
  o.port = login.port;
  o.user = site.ssh_user;
  o.identity_file = site.ssh_identity;
  o.known_hosts_file = site.known_hosts;
  o.ciphers = site.ssh_cipher;
  o.connect_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(site.connect_timeout);
  o.keepalive_interval = std::chrono::duration_cast<std::chrono::milliseconds>(site.ssh_keepalive);
  return o;
}

namespace {

using unicore::Result;
using SteadyClock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// UNICORE

class UnicoreBackend final : public JobBackend {
 public:
  UnicoreBackend(boost::asio::io_context& io, const SiteConfig& site, BridgeMetrics* metrics)
      : site_(site.name), metrics_(metrics), client_(io, options_for(site)) {}

  void get_core_info(const Credentials& creds, Callback<unicore::CoreInfo> done) override {
    client_.get_core_info(creds, timed<unicore::CoreInfo>("core_info", std::move(done)));
  }
  void submit(const Credentials& creds, const unicore::JobDescription& job,
              Callback<std::string> done) override {
    client_.submit(creds, job, timed<std::string>("submit", std::move(done)));
  }
  void start(const Credentials& creds, const std::string& job,
             Callback<unicore::Done> done) override {
    client_.start(creds, job, timed<unicore::Done>("start", std::move(done)));
  }
  void get_job(const Credentials& creds, const std::string& job,
               Callback<unicore::JobInfo> done) override {
    client_.get_job(creds, job, timed<unicore::JobInfo>("get_job", std::move(done)),
                    {"status", "statusMessage", "exitCode", "queue", "batchSystemID"});
  }
  void get_details(const Credentials& creds, const std::string& job,
                   Callback<unicore::JobDetails> done) override {
    client_.get_details(creds, job, timed<unicore::JobDetails>("get_details", std::move(done)));
  }
  void download(const Credentials& creds, const std::string& storage, const std::string& path,
                Callback<std::string> done) override {
    // The discovery file is a few hundred bytes; anything much larger is not it.
    client_.download(
        creds, storage, path, std::nullopt,
        timed<unicore::Download>("download",
                                 [done = std::move(done)](Result<unicore::Download> r) {
                                   if (!r) return done(r.error());
                                   done(std::move(r.value().bytes));
                                 }),
        std::size_t{64} * 1024);
  }
  void upload(const Credentials& creds, const std::string& storage, const std::string& path,
              std::string bytes, Callback<unicore::Done> done) override {
    client_.upload(creds, storage, path, std::move(bytes),
                   timed<unicore::Done>("upload", std::move(done)));
  }
  void abort(const Credentials& creds, const std::string& job,
             Callback<unicore::Done> done) override {
    client_.abort(creds, job, timed<unicore::Done>("abort", std::move(done)));
  }
  std::string working_directory(const std::string& job_url,
                                const unicore::JobInfo* info) const override {
    if (info && !info->working_directory.empty()) return info->working_directory;
    unicore::JobInfo bare;
    bare.url = job_url;
    return client_.working_directory(bare);
  }

 private:
  static unicore::ClientOptions options_for(const SiteConfig& site) {
    unicore::ClientOptions o;
    o.base_url = site.unicore_url;
    o.tls.verify = site.verify_tls;
    o.tls.ca_file = site.ca_file;
    o.gpu_mode = site.gpu_mode == GpuMode::batch_lines ? unicore::GpuMode::batch_lines
                                                       : unicore::GpuMode::gpus_per_node;
    o.connect_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(site.connect_timeout);
    return o;
  }

  // Wraps a callback so every request's duration and failure are counted.
  template <class T>
  Callback<T> timed(const char* method, Callback<T> done) {
    auto started = SteadyClock::now();
    return [this, method, started, done = std::move(done)](Result<T> r) {
      if (metrics_) {
        double seconds = std::chrono::duration<double>(SteadyClock::now() - started).count();
        metrics_->unicore_latency.with({site_, method}).observe(seconds);
        if (!r) metrics_->unicore_errors.with({site_, unicore::to_string(r.error().kind)}).inc();
      }
      done(std::move(r));
    };
  }

  std::string site_;
  BridgeMetrics* metrics_;
  unicore::UnicoreClient client_;
};

// ---------------------------------------------------------------------------------------------
// SSH link

bool host_key_error(const boost::system::error_code& ec) {
  using tunnel::SshError;
  if (ec.category() != tunnel::ssh_category()) return false;
  auto e = static_cast<SshError>(ec.value());
  return e == SshError::host_key_unknown || e == SshError::host_key_changed ||
         e == SshError::host_key_error;
}

class SshKernelLink final : public KernelLink {
 public:
  SshKernelLink(boost::asio::io_context& io, tunnel::SshConnectionPool& pool, const LinkSpec& spec,
                LinkEventSink events)
      : io_(io), pool_(pool), spec_(spec), shared_(std::make_shared<Shared>()) {
    shared_->events = std::move(events);
  }

  ~SshKernelLink() override {
    shared_->events = nullptr;  // nothing reaches the lifecycle from a link being destroyed
    shared_->pending = nullptr;
    if (hub_) hub_->close("the kernel's link was released");
  }

  std::array<std::uint16_t, 5> listen() override {
    tunnel::ConnectionInfo info;
    const HubConnection& c = spec_.connection;
    info.ip = c.ip;
    info.transport = c.transport;
    info.key = c.key;
    info.signature_scheme = c.signature_scheme;
    info.port(tunnel::ChannelKind::shell) = c.shell_port;
    info.port(tunnel::ChannelKind::iopub) = c.iopub_port;
    info.port(tunnel::ChannelKind::stdin_) = c.stdin_port;
    info.port(tunnel::ChannelKind::control) = c.control_port;
    info.port(tunnel::ChannelKind::hb) = c.hb_port;
    tunnel::HubKernel::Options options;
    options.connection = std::move(info);
    options.bind_address = c.ip.empty() ? "127.0.0.1" : c.ip;
    options.agent = "the agent of kernel " + spec_.kernel_id;
    options.secret = spec_.secret;
    options.link.log_id = spec_.kernel_id;
    options.shutdown_timeout = std::chrono::seconds(10);

    std::weak_ptr<Shared> weak = shared_;
    auto provider = [this, weak](std::function<void(tunnel::TransportResult)> done) {
      auto shared = weak.lock();
      if (!shared) return;
      if (!shared->agent) {
        shared->pending = std::move(done);  // asked again once the agent is known
        return;
      }
      open_channel(std::move(done));
    };
    hub_ = tunnel::HubKernel::create(
        io_, std::move(options), provider, [weak](const tunnel::HubEvent& event) {
          auto shared = weak.lock();
          if (!shared || !shared->events) return;
          shared->events(std::visit([](const auto& e) -> LinkEvent { return e; }, event));
        });
    std::array<std::uint16_t, tunnel::kChannelKinds> bound{};
    try {
      bound = spec_.handover ? hub_->adopt(*spec_.handover).ports : hub_->listen().ports;
      spec_.handover.reset();  // its descriptors are the HubKernel's now
      hub_->start();
    } catch (const std::exception& e) {
      hub_.reset();
      throw LinkListenError(e.what());
    }
    return bound;
  }

  void connect(const AgentAddress& agent) override {
    shared_->agent = agent;
    if (auto pending = std::move(shared_->pending)) {
      shared_->pending = nullptr;
      open_channel(std::move(pending));
    }
  }

  void interrupt() override {
    if (hub_) hub_->interrupt();
  }

  void quiesce(std::chrono::milliseconds timeout, HandoverDone done) override {
    if (!hub_) {
      done(std::nullopt, "the kernel does not listen");
      return;
    }
    hub_->quiesce(timeout, std::move(done));
  }
  void restart() override {
    if (hub_) hub_->restart();
  }
  void shutdown(std::function<void()> done) override {
    if (!hub_) {
      if (done) done();
      return;
    }
    hub_->shutdown(std::move(done));
  }
  void close(const std::string& reason) override {
    if (hub_) hub_->close(reason);
  }

  LinkTraffic traffic() const override {
    LinkTraffic t;
    if (!hub_) return t;
    const auto link = hub_->stats().link;
    t.to_kernel = link.stream_bytes_out;
    t.from_kernel = link.stream_bytes_in;
    t.resumes = link.resumes;
    return t;
  }

  std::string login_host() const override {
    const auto& hosts = spec_.site->login_hosts;
    if (hosts.empty()) return "(no login host)";
    return hosts[login_index_ % hosts.size()].str();
  }

 private:
  struct Shared {
    LinkEventSink events;
    std::optional<AgentAddress> agent;
    std::function<void(tunnel::TransportResult)> pending;
  };

  tunnel::SshOptions ssh_options() const {
    const SiteConfig& site = *spec_.site;
    tunnel::SshOptions o =
        site_ssh_options(site, site.login_hosts[login_index_ % site.login_hosts.size()]);
    // A channel request waits through a reconnect, but not forever: HubKernel asks again.
    o.open_timeout = o.connect_timeout * 2;
    return o;
  }

  void open_channel(std::function<void(tunnel::TransportResult)> done) {
    if (spec_.site->login_hosts.empty()) {
      done({make_error_code(tunnel::SshError::connect_failed),
            "site " + spec_.site->name + " has no login host configured", nullptr, true});
      return;
    }
    auto connection = pool_.get(ssh_options());
    AgentAddress agent = *shared_->agent;
    std::weak_ptr<Shared> weak = shared_;
    std::string via = login_host();
    connection->async_open_channel(
        agent.host, agent.port,
        [this, weak, done = std::move(done), via](boost::system::error_code ec, std::string message,
                                                  tunnel::ByteTransportPtr transport) {
          auto shared = weak.lock();
          if (!shared) return;
          if (!ec && transport) {
            done({{}, {}, std::move(transport), false});
            return;
          }
          bool permanent = tunnel::is_permanent_ssh_error(ec);
          if (permanent && shared->events) {
            shared->events(SshRefused{host_key_error(ec) ? SshRefused::Cause::host_key_mismatch
                                                         : SshRefused::Cause::identity_refused,
                                      message});
          }
          if (!permanent && spec_.site->login_hosts.size() > 1 &&
              ec == make_error_code(tunnel::SshError::connect_failed)) {
            ++login_index_;  // the next attempt tries the next login host
          }
          done({ec, "cannot open a channel to the agent via " + via + ": " + message, nullptr,
                permanent});
        });
  }

  boost::asio::io_context& io_;
  tunnel::SshConnectionPool& pool_;
  LinkSpec spec_;
  std::shared_ptr<Shared> shared_;
  std::shared_ptr<tunnel::HubKernel> hub_;
  std::size_t login_index_ = 0;
};

}  // namespace

std::unique_ptr<JobBackend> make_unicore_backend(boost::asio::io_context& io,
                                                 const SiteConfig& site, BridgeMetrics* metrics) {
  return std::make_unique<UnicoreBackend>(io, site, metrics);
}

KernelLinkFactory make_ssh_link_factory(boost::asio::io_context& io,
                                        tunnel::SshConnectionPool& pool) {
  return [&io, &pool](const LinkSpec& spec, LinkEventSink events) -> std::unique_ptr<KernelLink> {
    return std::make_unique<SshKernelLink>(io, pool, spec, std::move(events));
  };
}

}  // namespace kb::bridge
