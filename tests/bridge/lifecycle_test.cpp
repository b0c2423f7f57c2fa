// Tests of bridge/lifecycle.*: the kernel state machine, driven through the fixture's fake UNICORE
// site and fake hub-side link on fake time (tests/bridge/lifecycle_fixture.hpp). Re-attaching
// after a restart: lifecycle_store_test.cpp.
#include <gtest/gtest.h>
#include <signal.h>

#include <string>
#include <vector>

#include "tests/bridge/lifecycle_fixture.hpp"

namespace kb::bridge {
namespace {

using namespace kb::bridge::test;

// ---- the way to ready -------------------------------------------------------------------------

TEST_F(LifecycleTest, WalksEveryStateToReadyWithProgressAPersonCanFollow) {
  std::string id = ready_kernel(request());
  KernelView v = view(id);
  std::vector<KernelState> seen;
  for (const auto& h : v.history) seen.push_back(h.state);
  EXPECT_EQ(seen, (std::vector<KernelState>{KernelState::requested, KernelState::submitted,
                                            KernelState::queued, KernelState::starting,
                                            KernelState::connecting, KernelState::ready}));
  EXPECT_EQ(v.job_id, "job1");
  EXPECT_EQ(v.node, "cn0042");
  ASSERT_TRUE(v.walltime_end.has_value());
  EXPECT_TRUE(has_progress(v, "job job1 submitted to site demo"));
  EXPECT_TRUE(has_progress(v, "queued in batch"));
  EXPECT_TRUE(has_progress(v, "running on cn0042"));
  EXPECT_TRUE(has_progress(v, "connecting to agent at 10.0.0.6:40123 via login.example:22"));
  ASSERT_TRUE(link().agent.has_value());
  EXPECT_EQ(link().agent->host, "10.0.0.6");
  EXPECT_EQ(link().agent->port, 40123);
  EXPECT_EQ(jobs.tokens_seen, std::vector<std::string>{"tok-alice"});
}

TEST_F(LifecycleTest, JobCarriesSecretPrivatelyTagsAndResourcesAndRunsTheAgent) {
  create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  const auto& d = jobs.job().description;
  const unicore::JobImport* secret = nullptr;
  const unicore::JobImport* script = nullptr;
  for (const auto& im : d.imports) {
    if (im.to == kSecretFile) secret = &im;
    if (im.to == kJobScriptFile) script = &im;
  }
  ASSERT_NE(secret, nullptr);
  EXPECT_EQ(secret->permissions, "rw-------");
  ASSERT_TRUE(secret->data.has_value());
  EXPECT_EQ(secret->data->size(), 65u);                       // 64 hex characters and a newline
  EXPECT_EQ(link().spec.secret.hex() + "\n", *secret->data);  // the agent and the link agree
  ASSERT_NE(script, nullptr);
  EXPECT_NE(script->data->find("exec /opt/kb/bin/kernel-bridge agent --listen \"$KB_AGENT_LISTEN\" "
                               "--secret-file kernel-bridge-link.secret --discovery-file "
                               "kernel-bridge-agent.json"),
            std::string::npos)
      << *script->data;
  EXPECT_NE(script->data->find("-- python3 -m ipykernel_launcher -f '{connection_file}'"),
            std::string::npos)
      << *script->data;
  EXPECT_EQ(script->data->find("k3y"),
            std::string::npos);  // the Jupyter key never goes to the site
  EXPECT_EQ(d.resources.queue, "batch");
  EXPECT_EQ(d.resources.nodes, 1);
  EXPECT_EQ(d.resources.runtime, "3600");
  std::string id = links.links[0]->spec.kernel_id;
  EXPECT_NE(std::find(d.tags.begin(), d.tags.end(), "kernel-bridge-kernel:" + id), d.tags.end());
  EXPECT_NE(std::find(d.tags.begin(), d.tags.end(), "kernel-bridge-user:alice"), d.tags.end());
  EXPECT_NE(std::find(d.tags.begin(), d.tags.end(), "jupyter"), d.tags.end());
}

TEST_F(LifecycleTest, UploadedAgentIsStagedBeforeTheJobStarts) {
  config.sites[0].agent.mode = AgentConfig::Mode::upload;
  LifecycleOptions o;
  o.agent_uploads["demo"] = std::make_shared<const std::string>(
      "\x7f"
      "ELF fake agent");
  o.watch.starting_initial = o.watch.starting_max = std::chrono::milliseconds(2);
  o.clock = &clock;
  lifecycle = std::make_unique<KernelLifecycle>(
      io, config, credentials, &metrics, std::map<std::string, JobBackend*>{{"demo", &jobs}},
      [this](const LinkSpec& spec, LinkEventSink sink) {
        return std::make_unique<FakeLink>(links, spec, std::move(sink));
      },
      o);
  std::string id = create_ok(request());
  run_until([&] { return !jobs.order.empty() && jobs.job().started; });
  EXPECT_TRUE(jobs.job().description.have_client_stage_in);
  EXPECT_EQ(jobs.job().files[kUploadedAgentFile],
            "\x7f"
            "ELF fake agent");
  bool chmod = false;
  for (const auto& im : jobs.job().description.imports) {
    if (im.to == kJobScriptFile)
      chmod = im.data->find("chmod 700 ./kernel-bridge-agent") != std::string::npos;
  }
  EXPECT_TRUE(chmod);
  EXPECT_TRUE(has_progress(view(id), "uploading the agent"));
}

// ---- refusals at the door -----------------------------------------------------------------------

TEST_F(LifecycleTest, NoTokenIsRefusedAtCreateSayingWhatToDo) {
  auto v = create(request(), Caller{"bob", false, false, "test bob"});
  ASSERT_TRUE(std::holds_alternative<ServiceError>(v));
  const auto& e = std::get<ServiceError>(v);
  EXPECT_EQ(e.kind, ServiceErrorKind::credentials_missing);
  EXPECT_NE(e.message.find("no UNICORE token for user bob"), std::string::npos);
  EXPECT_TRUE(jobs.order.empty());
}

TEST_F(LifecycleTest, PortsOfALiveKernelAreAConflict) {
  ready_kernel(request(50000));
  auto v = create(request(50003, "other"));
  ASSERT_TRUE(std::holds_alternative<ServiceError>(v));
  EXPECT_EQ(std::get<ServiceError>(v).kind, ServiceErrorKind::conflict);
}

// Issue 15: the conflict names the kernel only to its owner; to anyone else it is not there.
TEST_F(LifecycleTest, APortConflictNamesTheKernelOnlyToItsOwner) {
  const std::string mine = ready_kernel(request(50000));
  credentials.set("bob", "tok-bob", std::nullopt);
  auto theirs = create(request(50003, "other"), Caller{"bob", false, false, "test bob"});
  ASSERT_TRUE(std::holds_alternative<ServiceError>(theirs));
  EXPECT_EQ(std::get<ServiceError>(theirs).kind, ServiceErrorKind::conflict);
  EXPECT_EQ(std::get<ServiceError>(theirs).message.find(mine), std::string::npos);
  EXPECT_NE(std::get<ServiceError>(theirs).message.find("another user's kernel"),
            std::string::npos);
  auto own = create(request(50003, "other"));
  ASSERT_TRUE(std::holds_alternative<ServiceError>(own));
  EXPECT_NE(std::get<ServiceError>(own).message.find(mine), std::string::npos);
}

// ---- ends and their reasons -------------------------------------------------------------------

TEST_F(LifecycleTest, RefusedTokenEndsWithCredentialsRefusedNamingTheSite) {
  jobs.refuse_submit = unicore::UnicoreError{
      ErrorKind::refused, 403, "https://unicore.example refused the credentials (403)",
      "Authentication failed", ""};
  std::string id = create_ok(request());
  run_until_state(id, KernelState::ended);
  KernelView v = view(id);
  EXPECT_EQ(v.end_cause, EndCause::credentials_refused);
  EXPECT_NE(v.reason.find("site demo refused the UNICORE credentials of user alice"),
            std::string::npos)
      << v.reason;
  EXPECT_TRUE(link().closed);  // hub ports released
}

TEST_F(LifecycleTest, UnicoreDownAtStartEndsWithSubmitFailed) {
  jobs.refuse_submit = unicore::UnicoreError{ErrorKind::connect, 0,
                                             "cannot connect to https://unicore.example", "", ""};
  std::string id = create_ok(request());
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::submit_failed);
  EXPECT_NE(view(id).reason.find("cannot connect to https://unicore.example"), std::string::npos);
}

TEST_F(LifecycleTest, FailedJobEndsWithTheSitesStatusMessageVerbatim) {
  std::string id = create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  jobs.job().status = JobStatus::failed;
  jobs.job().status_message = "Partition/Queue nope is not available at this site.";
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::job_failed);
  EXPECT_EQ(view(id).reason, "Partition/Queue nope is not available at this site.");
  EXPECT_TRUE(link().closed);
  EXPECT_EQ(jobs.job().aborts, 0);  // already over: nothing to abort
}

TEST_F(LifecycleTest, WalltimeIsNamedWhenTheAgentTerminatesAndTheJobHitItsLimit) {
  std::string id = ready_kernel(request());
  link().emit(hub_event::AgentTerminating{"SIGTERM received (allocation ending)"});
  link().emit(hub_event::KernelExited{.code = std::nullopt, .signal = SIGTERM});
  jobs.job().status = JobStatus::failed;
  jobs.job().status_message =
      "Batch job 4711 was terminated by the batch system: state TIMEOUT, CANCELLED DUE TO TIME "
      "LIMIT (walltime of 01:00:00 reached).";
  run_until_state(id, KernelState::ended);
  KernelView v = view(id);
  EXPECT_EQ(v.end_cause, EndCause::walltime);
  EXPECT_NE(v.reason.find("walltime reached"), std::string::npos);
  EXPECT_NE(v.reason.find("CANCELLED DUE TO TIME LIMIT"), std::string::npos);
}

TEST_F(LifecycleTest, AnExpiredTokenPausesWatchingAndTheKernelKeepsRunning) {
  std::string id = ready_kernel(request());
  // The token the job was submitted with expires while the user works.
  jobs.refuse_get = unicore::UnicoreError{ErrorKind::refused, 401,
                                          "https://unicore.example refused the credentials (401)",
                                          "token expired", ""};
  run_until([&] { return has_progress(view(id), "cannot see the job's status"); });
  const std::size_t refused_polls = jobs.get_tokens_seen.size();
  clock.advance(std::chrono::milliseconds(200));
  EXPECT_GT(jobs.get_tokens_seen.size(), refused_polls);  // still trying, with a backoff
  EXPECT_EQ(view(id).state, KernelState::ready);
  EXPECT_EQ(view(id).end_cause, EndCause::none);
  EXPECT_EQ(jobs.job().aborts, 0);
  EXPECT_FALSE(link().closed);
  // JupyterHub pushes a fresh token: the next poll uses it and watching resumes.
  credentials.set("alice", "tok-fresh", std::nullopt);
  jobs.refuse_get.reset();
  run_until([&] { return has_progress(view(id), "accepts the token of user alice again"); });
  EXPECT_EQ(jobs.get_tokens_seen.back(), "tok-fresh");
  // The job's end is noticed again.
  jobs.job().status = JobStatus::failed;
  jobs.job().status_message = "Batch job 4711 was cancelled by the site";
  run_until_state(id, KernelState::ended);
}

// The token expires between the job starting and the agent's discovery file being read: the kernel
// waits for a fresh token instead of ending (the job runs meanwhile).
TEST_F(LifecycleTest, ARefusedDiscoveryReadWaitsForAFreshToken) {
  std::string id = create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  jobs.refuse_download = unicore::UnicoreError{
      ErrorKind::refused, 401, "https://unicore.example refused the credentials (401)",
      "token expired", ""};
  jobs.job().status = JobStatus::running;
  run_until([&] { return has_progress(view(id), "cannot be reached until JupyterHub pushes"); });
  const std::size_t refused_reads = jobs.download_tokens_seen.size();
  clock.advance(std::chrono::milliseconds(200));
  EXPECT_GT(jobs.download_tokens_seen.size(), refused_reads);  // still trying, with a backoff
  EXPECT_LT(jobs.download_tokens_seen.size(), refused_reads + 30);
  EXPECT_EQ(view(id).state, KernelState::starting);
  EXPECT_EQ(view(id).end_cause, EndCause::none);
  EXPECT_EQ(jobs.job().aborts, 0);
  // JupyterHub pushes a fresh token; the agent has written its file meanwhile.
  credentials.set("alice", "tok-fresh", std::nullopt);
  jobs.refuse_download.reset();
  jobs.job().files[kDiscoveryFile] = R"({"host": "10.0.0.6", "port": 40123})";
  run_until_state(id, KernelState::connecting);
  EXPECT_EQ(jobs.download_tokens_seen.back(), "tok-fresh");
  EXPECT_TRUE(has_progress(view(id), "accepts the token of user alice again"));
  link().emit(hub_event::LinkUp{});
  link().emit(hub_event::KernelStarted{.pid = 99, .restart = false});
  run_until_state(id, KernelState::ready);
}

// Refused until the discovery timeout: without the file the bridge cannot tell a working agent from
// a broken one, so the kernel ends — as credentials_refused, saying what to do.
TEST_F(LifecycleTest, ADiscoveryReadRefusedUntilTheTimeoutEndsAsCredentialsRefused) {
  make(std::chrono::seconds(30), std::chrono::milliseconds(5000), std::chrono::seconds(1));
  std::string id = create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  jobs.refuse_download = unicore::UnicoreError{
      ErrorKind::refused, 403, "https://unicore.example refused the credentials (403)", "", ""};
  jobs.job().status = JobStatus::running;
  run_until_state(id, KernelState::ended);
  const KernelView v = view(id);
  EXPECT_EQ(v.end_cause, EndCause::credentials_refused);
  EXPECT_NE(v.reason.find("site demo refused the UNICORE credentials of user alice while the "
                          "bridge looked for the agent of job"),
            std::string::npos)
      << v.reason;
  EXPECT_NE(v.reason.find("Log in to JupyterHub again"), std::string::npos) << v.reason;
}

TEST_F(LifecycleTest, AbortFromOutsideIsCancelled) {
  std::string id = ready_kernel(request());
  jobs.job().status = JobStatus::failed;
  jobs.job().status_message = "Job aborted.";
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::cancelled);
  EXPECT_NE(view(id).reason.find("cancelled outside the bridge: Job aborted."), std::string::npos);
}

TEST_F(LifecycleTest, HostKeyRefusalEndsWithTheFingerprintMessageAndAbortsTheJob) {
  std::string id = create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  jobs.job().status = JobStatus::running;
  jobs.job().files[kDiscoveryFile] = R"({"host": "10.0.0.6", "port": 40123})";
  run_until_state(id, KernelState::connecting);
  link().emit(SshRefused{SshRefused::Cause::host_key_mismatch,
                         "host key of login.example:22 changed: SHA256:abc is not in known_hosts"});
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::host_key_mismatch);
  EXPECT_NE(view(id).reason.find("SHA256:abc"), std::string::npos);
  run_until([&] { return jobs.job().aborts == 1; });
  EXPECT_EQ(lifecycle->live_allocations(), 0u);
}

TEST_F(LifecycleTest, KernelExitEndsWithCodeAndTheJobIsAbortedAfterTheGrace) {
  make(std::chrono::seconds(0));  // no grace: released at once
  std::string id = ready_kernel(request());
  link().emit(hub_event::KernelExited{.code = 3, .signal = std::nullopt});
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::kernel_exited);
  EXPECT_EQ(view(id).exit_code, 3);
  EXPECT_NE(view(id).reason.find("exited with code 3"), std::string::npos);
  run_until([&] { return jobs.job().aborts == 1; });
  EXPECT_EQ(lifecycle->live_allocations(), 0u);
}

TEST_F(LifecycleTest, KernelKilledBySignalEndsNamingTheSignal) {
  make(std::chrono::seconds(0));
  std::string id = ready_kernel(request());
  link().emit(hub_event::KernelExited{.code = std::nullopt, .signal = SIGKILL});
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::kernel_exited);
  EXPECT_EQ(view(id).exit_signal, SIGKILL);
  EXPECT_FALSE(view(id).exit_code.has_value());
  EXPECT_EQ(view(id).reason, "the kernel was killed by SIGKILL");
}

TEST_F(LifecycleTest, RefusedIdentityEndsTheKernelNamingWhatToCheck) {
  std::string id = create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  jobs.job().status = JobStatus::running;
  jobs.job().files[kDiscoveryFile] = R"({"host": "10.0.0.6", "port": 40123})";
  run_until_state(id, KernelState::connecting);
  link().emit(SshRefused{SshRefused::Cause::identity_refused,
                         "svc@login.example:22: authentication denied (publickey)"});
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::link_failed);
  EXPECT_NE(view(id).reason.find("authentication denied"), std::string::npos) << view(id).reason;
  EXPECT_NE(view(id).reason.find("Check the site's ssh_user and ssh_identity"), std::string::npos)
      << view(id).reason;
  run_until([&] { return jobs.job().aborts == 1; });
}

// ---- link drops and restarts --------------------------------------------------------------------

TEST_F(LifecycleTest, LinkDownIsReconnectingNotDeath) {
  std::string id = ready_kernel(request());
  link().emit(hub_event::LinkDown{"SSH connection lost"});
  run_until_state(id, KernelState::reconnecting);
  EXPECT_EQ(view(id).end_cause, EndCause::none);
  link().emit(hub_event::LinkUp{});
  run_until_state(id, KernelState::ready);
  EXPECT_EQ(view(id).link_reconnects, 1u);
  EXPECT_EQ(jobs.job().aborts, 0);
}

TEST_F(LifecycleTest, RestartAsksTheAgentAndKeepsTheJob) {
  std::string id = ready_kernel(request());
  std::optional<std::optional<ServiceError>> r;
  lifecycle->restart(alice(), id, [&](std::optional<ServiceError> e) { r = e; });
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->has_value());
  EXPECT_EQ(link().restarts, 1);
  // The old kernel's exit during a restart is not the kernel's end.
  link().emit(hub_event::KernelExited{.code = std::nullopt, .signal = SIGTERM});
  link().emit(hub_event::KernelStarted{.pid = 100, .restart = true});
  run_until([&] { return has_progress(view(id), "kernel restarted (pid 100)"); });
  EXPECT_EQ(view(id).state, KernelState::ready);
  EXPECT_EQ(view(id).restarts, 1);
  EXPECT_EQ(jobs.order.size(), 1u);
}

TEST_F(LifecycleTest, JupyterRestartReusesTheAllocationWithinTheGrace) {
  std::string first = ready_kernel(request());
  std::optional<std::optional<ServiceError>> r;
  lifecycle->remove(alice(), first, [&](std::optional<ServiceError> e) { r = e; });
  run_until_state(first, KernelState::ended);
  EXPECT_EQ(view(first).end_cause, EndCause::shutdown);
  EXPECT_FALSE(link().closed);  // listeners and link kept for the grace
  EXPECT_EQ(jobs.job().aborts, 0);

  std::string second = create_ok(request());  // same ports and key
  EXPECT_NE(second, first);
  EXPECT_EQ(view(second).job_id, view(first).job_id);
  EXPECT_EQ(jobs.order.size(), 1u);   // no new job
  EXPECT_EQ(links.links.size(), 1u);  // the same hub-side listeners
  EXPECT_EQ(link().restarts, 1);
  link().emit(hub_event::KernelExited{.code = std::nullopt, .signal = SIGTERM});
  link().emit(hub_event::KernelStarted{.pid = 101, .restart = true});
  run_until_state(second, KernelState::ready);
}

TEST_F(LifecycleTest, AnotherKeyOnTheSamePortsGetsAFreshAllocation) {
  std::string first = ready_kernel(request());
  lifecycle->remove(alice(), first, [](std::optional<ServiceError>) {});
  run_until_state(first, KernelState::ended);
  std::string second = create_ok(request(50000, "new-key"));
  EXPECT_TRUE(links.links[0]->closed);
  run_until([&] { return jobs.order.size() == 2; });
  run_until([&] { return jobs.job(0).aborts == 1; });
  EXPECT_NE(view(second).job_id, view(first).job_id);
}

TEST_F(LifecycleTest, WithoutARestartTheGraceEndsWithTheJobAborted) {
  make(std::chrono::seconds(1));
  std::string id = ready_kernel(request());
  lifecycle->remove(alice(), id, [](std::optional<ServiceError>) {});
  run_until_state(id, KernelState::ended);
  run_until([&] { return jobs.job().aborts == 1; });
  EXPECT_EQ(link().shutdowns, 1);  // the agent was asked to stop its kernel first
  EXPECT_TRUE(link().closed);
  EXPECT_EQ(lifecycle->live_allocations(), 0u);
}

TEST_F(LifecycleTest, ALeaseKeepsAWatchedKernelAndShutsDownAnAbandonedOne) {
  make(std::chrono::seconds(1), std::chrono::milliseconds(20));
  KernelRequest r = request();
  r.lease = std::chrono::seconds(1);
  std::string id = ready_kernel(r);
  // Watched (as the wrapper's status requests do) for twice the lease: it stays.
  const auto until = clock.now() + std::chrono::milliseconds(2000);
  while (clock.now() < until) {
    lifecycle->watched(id);
    clock.advance(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(view(id).state, KernelState::ready);
  // Nobody asks any more (the wrapper was SIGKILLed): shut down like a DELETE, then, without a
  // restart within the grace, the job is aborted.
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::shutdown);
  EXPECT_NE(view(id).reason.find("no status request from its front end"), std::string::npos)
      << view(id).reason;
  run_until([&] { return jobs.job().aborts == 1; });
  EXPECT_EQ(link().shutdowns, 1);
  EXPECT_EQ(lifecycle->live_allocations(), 0u);
}

TEST_F(LifecycleTest, KernelsWithoutALeaseAreNeverExpired) {
  make(std::chrono::seconds(30), std::chrono::milliseconds(20));
  std::string id = ready_kernel(request());  // lease 0: an API client that does not poll
  clock.advance(std::chrono::milliseconds(1500));
  EXPECT_EQ(view(id).state, KernelState::ready);
}

TEST_F(LifecycleTest, BridgeShutdownEndsEveryKernelAndAbortsEveryJob) {
  std::string a = ready_kernel(request(50000));
  std::string b = create_ok(request(51000));
  run_until([&] { return jobs.order.size() == 2; });
  run_until_state(b, KernelState::submitted);
  bool done = false;
  lifecycle->shutdown([&] { done = true; });
  run_until([&] { return done; });
  EXPECT_EQ(view(a).state, KernelState::ended);
  EXPECT_EQ(view(b).state, KernelState::ended);
  EXPECT_EQ(view(a).end_cause, EndCause::shutdown);
  EXPECT_EQ(jobs.job(0).aborts, 1);
  EXPECT_EQ(jobs.job(1).aborts, 1);
  auto v = create(request(52000));
  ASSERT_TRUE(std::holds_alternative<ServiceError>(v));
  EXPECT_EQ(std::get<ServiceError>(v).kind, ServiceErrorKind::unavailable);
}

TEST_F(LifecycleTest, InterruptGoesToTheAgentOnlyOnceAKernelRuns) {
  std::string id = create_ok(request());
  std::optional<std::optional<ServiceError>> r;
  lifecycle->interrupt(alice(), id, [&](std::optional<ServiceError> e) { r = e; });
  ASSERT_TRUE(r && r->has_value());
  EXPECT_EQ((*r)->kind, ServiceErrorKind::conflict);
  lifecycle.reset();
  links.links.clear();
  make(std::chrono::seconds(30));
  std::string ready = ready_kernel(request(53000));
  r.reset();
  lifecycle->interrupt(alice(), ready, [&](std::optional<ServiceError> e) { r = e; });
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->has_value());
  EXPECT_EQ(links.links.back()->interrupts, 1);
}

TEST_F(LifecycleTest, MetricsCountKernelsByState) {
  std::string id = ready_kernel(request());
  EXPECT_EQ(metrics.kernels.with({"ready"}).value(), 1.0);
  EXPECT_EQ(metrics.kernels.with({"queued"}).value(), 0.0);
  link().emit(hub_event::LinkDown{"x"});
  link().emit(hub_event::LinkUp{});
  run_until([&] { return view(id).link_reconnects == 1; });
  EXPECT_EQ(metrics.link_reconnects.with({"demo"}).value(), 1.0);
}

}  // namespace
}  // namespace kb::bridge

// What the site says a user may choose: asked with the user's token, kept for five minutes; without
// a token, or when the site fails, a note says why (and a failure is not kept).
namespace kb::bridge {
namespace {

using namespace kb::bridge::test;

TEST_F(LifecycleTest, UserChoicesComeFromTheSiteWithTheUsersTokenAndAreKeptBriefly) {
  jobs.core_info.available_groups = {"proj1", "users"};
  jobs.core_info.group = "users";
  jobs.core_info.queues = {"batch", "gpus"};
  std::optional<UserSiteChoices> got;
  lifecycle->user_choices(alice(), "demo", [&](UserSiteChoices c) { got = c; });
  run_until([&] { return got.has_value(); });
  EXPECT_EQ(got->projects, (std::vector<std::string>{"proj1", "users"}));
  EXPECT_EQ(got->default_project, "users");
  EXPECT_EQ(got->queues, (std::vector<std::string>{"batch", "gpus"}));
  EXPECT_TRUE(got->note.empty()) << got->note;
  ASSERT_EQ(jobs.core_info_tokens_seen.size(), 1u);
  EXPECT_EQ(jobs.core_info_tokens_seen[0], "tok-alice");
  EXPECT_EQ(lifecycle->known_projects("alice", "demo"),
            (std::vector<std::string>{"proj1", "users"}));
  EXPECT_FALSE(lifecycle->known_projects("bob", "demo"));
  // Asked again within the lifetime: from the cache.
  got.reset();
  lifecycle->user_choices(alice(), "demo", [&](UserSiteChoices c) { got = c; });
  run_until([&] { return got.has_value(); });
  EXPECT_EQ(jobs.core_info_tokens_seen.size(), 1u);

  // Another user without a token: a note, nothing asked.
  got.reset();
  lifecycle->user_choices(Caller{"bob", false, false, "test bob"}, "demo",
                          [&](UserSiteChoices c) { got = c; });
  run_until([&] { return got.has_value(); });
  EXPECT_TRUE(got->projects.empty());
  EXPECT_NE(got->note.find("holds no UNICORE token of user bob"), std::string::npos) << got->note;
  EXPECT_EQ(jobs.core_info_tokens_seen.size(), 1u);
}

TEST_F(LifecycleTest, ASiteThatFailsToSayIsANoteAndIsAskedAgainNextTime) {
  jobs.refuse_core_info = unicore::UnicoreError{unicore::ErrorKind::server, 503,
                                                "the site is down for maintenance", "", ""};
  std::optional<UserSiteChoices> got;
  lifecycle->user_choices(alice(), "demo", [&](UserSiteChoices c) { got = c; });
  run_until([&] { return got.has_value(); });
  EXPECT_TRUE(got->projects.empty());
  EXPECT_NE(got->note.find("the site is down for maintenance"), std::string::npos) << got->note;
  EXPECT_FALSE(lifecycle->known_projects("alice", "demo"));
  jobs.refuse_core_info.reset();
  jobs.core_info.available_groups = {"proj1"};
  got.reset();
  lifecycle->user_choices(alice(), "demo", [&](UserSiteChoices c) { got = c; });
  run_until([&] { return got.has_value(); });
  EXPECT_EQ(got->projects, std::vector<std::string>{"proj1"});
  EXPECT_EQ(jobs.core_info_tokens_seen.size(), 2u);
}

}  // namespace
}  // namespace kb::bridge
