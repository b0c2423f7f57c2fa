#pragma once
// The kernel lifecycle's test fixture (tests/bridge/lifecycle*_test.cpp): a fake UNICORE site
// (FakeJobs: jobs whose status the test sets, files the test writes), a fake hub-side link
// (FakeLink: records the lifecycle's commands; the test emits the agent's events) and a
// kb::ManualClock, so leases, grace periods, timeouts and the JobWatcher's polls run on fake time
// that the test advances: nothing sleeps and a run replays exactly.
#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "auth/credentials_store.hpp"
#include "bridge/config.hpp"
#include "bridge/lifecycle.hpp"
#include "bridge/lifecycle_backend.hpp"
#include "bridge/metrics.hpp"
#include "common/clock.hpp"

namespace kb::bridge::test {

namespace asio = boost::asio;
namespace hub_event = tunnel::hub_event;
using unicore::ErrorKind;
using unicore::JobStatus;
using unicore::Result;

// ---- fakes ----------------------------------------------------------------------------------

struct FakeJob {
  unicore::JobDescription description;
  JobStatus status = JobStatus::ready;
  std::string status_message;
  std::map<std::string, std::string> files;  // the job directory
  bool started = false;
  int aborts = 0;
};

class FakeJobs final : public JobBackend {
 public:
  explicit FakeJobs(asio::io_context& io) : io_(io) {}

  std::map<std::string, FakeJob> jobs;  // by URL
  std::vector<std::string> order;       // URLs in submission order
  std::optional<unicore::UnicoreError> refuse_submit;
  std::optional<unicore::UnicoreError> refuse_get;
  std::optional<unicore::UnicoreError> refuse_download;
  std::vector<std::string> tokens_seen;  // by submit
  std::vector<std::string> download_tokens_seen;
  std::vector<std::string> get_tokens_seen;  // by get_job
  std::vector<std::string> uploads;

  FakeJob& job(std::size_t i = 0) { return jobs.at(order.at(i)); }

  // The site's user info (GET BASE): the caller's groups and the published queues.
  unicore::CoreInfo core_info;
  std::optional<unicore::UnicoreError> refuse_core_info;
  std::vector<std::string> core_info_tokens_seen;
  void get_core_info(const Credentials& c, Callback<unicore::CoreInfo> done) override {
    core_info_tokens_seen.push_back(c.token);
    if (refuse_core_info) return later(done, Result<unicore::CoreInfo>(*refuse_core_info));
    later(done, Result<unicore::CoreInfo>(core_info));
  }

  void submit(const Credentials& c, const unicore::JobDescription& d,
              Callback<std::string> done) override {
    tokens_seen.push_back(c.token);
    if (refuse_submit) return later(done, Result<std::string>(*refuse_submit));
    std::string url = "https://site/rest/core/jobs/job" + std::to_string(order.size() + 1);
    order.push_back(url);
    jobs[url].description = d;
    jobs[url].started = !d.have_client_stage_in;
    later(done, Result<std::string>(url));
  }
  void start(const Credentials&, const std::string& job, Callback<unicore::Done> done) override {
    jobs.at(job).started = true;
    later(done, Result<unicore::Done>(unicore::Done{}));
  }
  void get_job(const Credentials& c, const std::string& url,
               Callback<unicore::JobInfo> done) override {
    get_tokens_seen.push_back(c.token);
    if (refuse_get) return later(done, Result<unicore::JobInfo>(*refuse_get));
    const FakeJob& j = jobs.at(url);
    unicore::JobInfo info;
    info.url = url;
    info.status = j.status;
    info.status_message = j.status_message;
    info.queue = "batch";
    info.batch_system_id = j.status == JobStatus::ready ? "N/A" : "4711";
    later(done, Result<unicore::JobInfo>(info));
  }
  void get_details(const Credentials&, const std::string&,
                   Callback<unicore::JobDetails> done) override {
    unicore::JobDetails d;
    d.available = true;
    d.nodes = {"cn0042"};
    later(done, Result<unicore::JobDetails>(d));
  }
  void download(const Credentials& c, const std::string& storage, const std::string& path,
                Callback<std::string> done) override {
    download_tokens_seen.push_back(c.token);
    if (refuse_download) return later(done, Result<std::string>(*refuse_download));
    const FakeJob& j = jobs.at(storage);
    auto it = j.files.find(path);
    if (it == j.files.end()) {
      return later(done, Result<std::string>(unicore::UnicoreError{
                             ErrorKind::not_found, 404, "no such file", "", storage + "/" + path}));
    }
    later(done, Result<std::string>(it->second));
  }
  void upload(const Credentials&, const std::string& storage, const std::string& path,
              std::string bytes, Callback<unicore::Done> done) override {
    uploads.push_back(path);
    jobs.at(storage).files[path] = std::move(bytes);
    later(done, Result<unicore::Done>(unicore::Done{}));
  }
  void abort(const Credentials&, const std::string& url, Callback<unicore::Done> done) override {
    FakeJob& j = jobs.at(url);
    ++j.aborts;
    if (!unicore::is_terminal(j.status)) {
      j.status = JobStatus::failed;
      j.status_message = "Job aborted.";
    }
    later(done, Result<unicore::Done>(unicore::Done{}));
  }
  // The fake's storage URL is the job URL itself.
  std::string working_directory(const std::string& job_url,
                                const unicore::JobInfo*) const override {
    return job_url;
  }

 private:
  template <class T>
  void later(Callback<T> done, Result<T> r) {
    asio::post(io_, [done = std::move(done), r = std::move(r)]() mutable { done(std::move(r)); });
  }
  asio::io_context& io_;
};

// What a fake link was told; outlives the link (the lifecycle destroys links it releases).
struct LinkRecord {
  LinkSpec spec;
  LinkEventSink sink;
  bool listening = false, closed = false, destroyed = false;
  std::string close_reason;
  std::optional<AgentAddress> agent;
  int interrupts = 0, restarts = 0, shutdowns = 0, quiesces = 0;
  bool refuse_quiesce = false;

  // An agent event, as the real link reports it (never after the link is gone).
  void emit(const LinkEvent& event) {
    if (!destroyed) sink(event);
  }
};

struct LinkLog {
  std::vector<std::shared_ptr<LinkRecord>> links;  // every link made, oldest first
};

struct FakeLink final : KernelLink {
  FakeLink(LinkLog& log, const LinkSpec& spec, LinkEventSink sink)
      : r(std::make_shared<LinkRecord>()) {
    r->spec = spec;
    r->sink = std::move(sink);
    log.links.push_back(r);
  }
  ~FakeLink() override { r->destroyed = true; }

  std::array<std::uint16_t, 5> listen() override {
    r->listening = true;
    const auto& c = r->spec.connection;
    return {c.shell_port, c.iopub_port, c.stdin_port, c.control_port, c.hb_port};
  }
  void connect(const AgentAddress& a) override { r->agent = a; }
  void interrupt() override { ++r->interrupts; }
  void restart() override { ++r->restarts; }
  void shutdown(std::function<void()> done) override {
    ++r->shutdowns;
    if (done) done();
  }
  void close(const std::string& reason) override {
    r->closed = true;
    r->close_reason = reason;
    r->listening = false;
  }
  LinkTraffic traffic() const override { return {}; }
  std::string login_host() const override { return "login.example:22"; }
  // Hands over descriptors -1 (nothing real to pass) unless told to refuse.
  void quiesce(std::chrono::milliseconds, HandoverDone done) override {
    ++r->quiesces;
    if (r->refuse_quiesce) {
      done(std::nullopt, "the fake link refuses");
      return;
    }
    tunnel::HubHandover h;
    h.link.self_id = "fake-session-of-" + r->spec.kernel_id;
    done(std::move(h), {});
  }

  std::shared_ptr<LinkRecord> r;
};

// ---- fixture --------------------------------------------------------------------------------

inline constexpr const char* kConfig = R"(
[bridge]
state_dir = "/tmp"
restart_grace = "30s"

[api]
unix_socket = "/tmp/kb-lifecycle-test.sock"

[[site]]
name = "demo"
unicore_url = "https://unicore.example/DEMO/rest/core"
login_hosts = ["login.example:22"]
known_hosts = "/etc/hostname"
ssh_user = "svc"
ssh_identity = "/etc/hostname"
agent = { mode = "installed", path = "/opt/kb/bin/kernel-bridge" }
job_tags = ["kernel-bridge", "jupyter"]
default_kernel = "python3"

[site.kernels]
python3 = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
)";

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LoadOptions lo;
    lo.check_files = false;
    config = parse_config(kConfig, "/tmp/test.toml", lo);
    credentials.set("alice", "tok-alice", std::nullopt);
    make(std::chrono::seconds(30));
  }

  void make(std::chrono::seconds grace,
            std::chrono::milliseconds tick = std::chrono::milliseconds(5000),
            std::chrono::seconds discovery_timeout = std::chrono::seconds(180)) {
    lifecycle.reset();
    LifecycleOptions o;
    o.discovery_timeout = discovery_timeout;
    o.restart_grace = grace;
    o.tick = tick;
    o.discovery_initial = std::chrono::milliseconds(1);
    o.discovery_max = std::chrono::milliseconds(5);
    o.watch.starting_initial = o.watch.starting_max = std::chrono::milliseconds(2);
    o.watch.queued_initial = o.watch.queued_max = std::chrono::milliseconds(2);
    o.watch.running_initial = o.watch.running_max = std::chrono::milliseconds(2);
    o.watch.error_initial = o.watch.error_max = std::chrono::milliseconds(2);
    o.rewatch_initial = o.rewatch_max = std::chrono::milliseconds(20);
    o.clock = &clock;
    o.store = store;
    lifecycle = std::make_unique<KernelLifecycle>(
        io, config, credentials, &metrics, std::map<std::string, JobBackend*>{{"demo", &jobs}},
        [this](const LinkSpec& spec, LinkEventSink sink) {
          return std::make_unique<FakeLink>(links, spec, std::move(sink));
        },
        o);
  }

  KernelRequest request(std::uint16_t base = 50000, std::string key = "k3y") {
    KernelRequest r;
    r.site = "demo";
    r.kernel_argv = {"python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"};
    r.kernel_name = "python3";
    r.resources.queue = "batch";
    r.resources.nodes = 1;
    r.resources.runtime = std::chrono::seconds(3600);
    r.connection.shell_port = base;
    r.connection.iopub_port = base + 1;
    r.connection.stdin_port = base + 2;
    r.connection.control_port = base + 3;
    r.connection.hb_port = base + 4;
    r.connection.key = key;
    return r;
  }

  Caller alice() { return Caller{"alice", false, false, "test alice"}; }

  std::variant<KernelView, ServiceError> create(KernelRequest r, Caller who = {}) {
    if (who.user.empty()) who = alice();
    std::optional<std::variant<KernelView, ServiceError>> out;
    lifecycle->create(who, std::move(r),
                      [&](std::variant<KernelView, ServiceError> v) { out.emplace(std::move(v)); });
    run_until([&] { return out.has_value(); });
    return *out;
  }

  std::string create_ok(KernelRequest r) {
    auto v = create(std::move(r));
    EXPECT_TRUE(std::holds_alternative<KernelView>(v))
        << (std::holds_alternative<ServiceError>(v) ? std::get<ServiceError>(v).message : "");
    return std::get<KernelView>(v).id;
  }

  KernelView view(const std::string& id) { return *lifecycle->get(id); }

  // Moves fake time on in small steps (running what falls due) until `done` holds; fails the test
  // (instead of hanging) after a generous bound of fake time.
  void run_until(const std::function<bool()>& done) {
    const auto deadline = clock.now() + std::chrono::seconds(10);
    while (!done()) {
      if (clock.now() > deadline) {
        ADD_FAILURE() << "condition not reached";
        return;
      }
      clock.advance(std::chrono::milliseconds(2));
    }
  }
  void run_until_state(const std::string& id, KernelState s) {
    run_until([&] { return view(id).state == s; });
  }

  LinkRecord& link(std::size_t i = 0) { return *links.links.at(i); }

  // Brings a kernel to ready: queued, running, discovery file, link up, kernel started.
  std::string ready_kernel(KernelRequest r) {
    std::string id = create_ok(std::move(r));
    std::size_t n = jobs.order.size();
    run_until([&] { return jobs.order.size() == n + 1; });
    FakeJob& j = jobs.job(n);
    j.status = JobStatus::queued;
    run_until_state(id, KernelState::queued);
    j.status = JobStatus::running;
    run_until_state(id, KernelState::starting);
    j.files[kDiscoveryFile] =
        R"({"host": "10.0.0.6", "port": 40123, "pid": 7, "hostname": "cn0042"})";
    run_until_state(id, KernelState::connecting);
    LinkRecord& l = *links.links.back();
    l.emit(hub_event::LinkUp{});
    l.emit(hub_event::KernelStarted{.pid = 99, .restart = false});
    run_until_state(id, KernelState::ready);
    return id;
  }

  static bool has_progress(const KernelView& v, const std::string& text) {
    for (const auto& p : v.progress) {
      if (p.message.find(text) != std::string::npos) return true;
    }
    return false;
  }

  asio::io_context io;
  kb::ManualClock clock{&io};  // outlives the lifecycle (declared before it)
  BridgeConfig config;
  auth::CredentialsStore credentials;
  MetricsRegistry registry;
  BridgeMetrics metrics{registry};
  FakeJobs jobs{io};
  LinkLog links;
  store::Store* store = nullptr;  // set before make() to record the kernels
  std::unique_ptr<KernelLifecycle> lifecycle;
};

}  // namespace kb::bridge::test
