// Tests of bridge/lifecycle_store.cpp: kernels recorded in a real SQLite store as they change, and
// a second lifecycle — the bridge after a crash or restart — re-attaching from it: the same ids,
// ports, key, link secret and agent, no new job, the job watched again only once the owner's token
// is pushed (tokens are never stored). The fixture's fakes and fake time as in lifecycle_test.cpp.
#include <gtest/gtest.h>

#include <string>

#include "store/sqlite_store.hpp"
#include "tests/bridge/lifecycle_fixture.hpp"
#include "tests/common/temp_dir.hpp"

namespace kb::bridge {
namespace {

using namespace kb::bridge::test;

class LifecycleStoreTest : public LifecycleTest {
 protected:
  void SetUp() override {
    opened = store::open_sqlite_store(dir.file("state.db"));
    store = opened.store.get();
    LifecycleTest::SetUp();
  }

  // The bridge process ends without a word (SIGKILL): nothing more is written; the tokens, which
  // live in memory only, are gone. A new lifecycle restores from the same file.
  // `handed_over`: what a planned restart's previous process handed over (none after a crash).
  RestoreSummary crash_and_restore(std::vector<HandedOver> handed_over = {}) {
    lifecycle.reset();
    credentials.erase("alice");
    opened.store.reset();
    opened = store::open_sqlite_store(dir.file("state.db"));
    store = opened.store.get();
    make(std::chrono::seconds(30));
    return lifecycle->restore(store->load(), std::move(handed_over));
  }

  kb::test::TempDir dir;
  store::SqliteOpened opened;
};

TEST_F(LifecycleStoreTest, AReadyKernelIsReattachedToItsAgentOnTheSamePortsWithNoNewJob) {
  const std::string id = ready_kernel(request(51000, "the-key"));
  const std::string secret = link(0).spec.secret.hex();
  const std::size_t polls_before = jobs.get_tokens_seen.size();

  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.reattaching, 1);
  EXPECT_EQ(summary.ended, 0);

  KernelView v = view(id);
  EXPECT_EQ(v.state, KernelState::reconnecting);
  EXPECT_EQ(v.owner, "alice");
  EXPECT_EQ(v.node, "cn0042");
  EXPECT_EQ(v.shell_port, 51000);
  EXPECT_EQ(v.hb_port, 51004);
  EXPECT_TRUE(has_progress(v, "the bridge restarted: re-attaching to the agent at 10.0.0.6:40123"));
  EXPECT_TRUE(has_progress(v, "holds no UNICORE token of user alice"));

  ASSERT_EQ(links.links.size(), 2u);
  LinkRecord& again = link(1);
  EXPECT_TRUE(again.listening);
  EXPECT_EQ(again.spec.connection.shell_port, 51000);
  EXPECT_EQ(again.spec.connection.hb_port, 51004);
  EXPECT_EQ(again.spec.connection.key, "the-key");
  EXPECT_EQ(again.spec.secret.hex(), secret);
  ASSERT_TRUE(again.agent.has_value());
  EXPECT_EQ(again.agent->host, "10.0.0.6");
  EXPECT_EQ(again.agent->port, 40123);

  again.emit(hub_event::LinkUp{});
  again.emit(hub_event::KernelStarted{.pid = 99, .restart = false});
  run_until_state(id, KernelState::ready);
  EXPECT_TRUE(has_progress(view(id), "re-attached: the kernel (pid 99) is running on cn0042"));
  EXPECT_EQ(view(id).restarts, 0);
  EXPECT_EQ(jobs.order.size(), 1u);  // no new job
  // Without a token nothing asked UNICORE; once the hub pushes one, the job is followed again.
  clock.advance(std::chrono::seconds(5));
  EXPECT_EQ(jobs.get_tokens_seen.size(), polls_before);
  credentials.set("alice", "tok-fresh", std::nullopt);
  run_until([&] { return jobs.get_tokens_seen.size() > polls_before; });
  EXPECT_EQ(jobs.get_tokens_seen.back(), "tok-fresh");
  EXPECT_EQ(view(id).state, KernelState::ready);
}

// A planned restart: the link is quiesced and handed over; the next lifecycle gives it to the new
// link (which takes the listeners and session instead of listening anew) and the kernel is ready
// as soon as the resumed link is up — no start_kernel, no "asking it what runs".
TEST_F(LifecycleStoreTest, AHandedOverLinkIsGivenToTheNextProcessAndReadyOnItsFirstLinkUp) {
  const std::string id = ready_kernel(request(51000, "the-key"));
  std::optional<std::vector<HandedOver>> handed;
  lifecycle->hand_over(std::chrono::seconds(5),
                       [&](std::vector<HandedOver> h) { handed = std::move(h); });
  run_until([&] { return handed.has_value(); });
  EXPECT_EQ(link(0).quiesces, 1);
  ASSERT_EQ(handed->size(), 1u);
  const std::string alloc_id = handed->front().allocation_id;
  EXPECT_EQ(handed->front().link.link.self_id, "fake-session-of-" + link(0).spec.kernel_id);

  const RestoreSummary summary = crash_and_restore(std::move(*handed));
  EXPECT_EQ(summary.reattaching, 1);
  EXPECT_EQ(summary.handed_over, 1);
  ASSERT_EQ(links.links.size(), 2u);
  LinkRecord& again = link(1);
  ASSERT_TRUE(again.spec.handover.has_value());
  EXPECT_EQ(again.spec.handover->link.self_id, "fake-session-of-" + link(0).spec.kernel_id);
  EXPECT_TRUE(has_progress(view(id), "the bridge restarted in place"));
  EXPECT_EQ(view(id).state, KernelState::reconnecting);
  again.emit(hub_event::LinkUp{});
  run_until_state(id, KernelState::ready);
  EXPECT_TRUE(has_progress(view(id), "re-attached: the link session resumed"));
  EXPECT_EQ(view(id).link_reconnects, 0u);
  // The agent's no-bridge timer is off: the kernel stays.
  clock.advance(std::chrono::seconds(700));
  EXPECT_EQ(view(id).state, KernelState::ready);
  EXPECT_EQ(jobs.order.size(), 1u);
}

// A link that cannot get quiet is not handed over; it is closed as detach() closes it, and the
// next process re-attaches it the ordinary way.
TEST_F(LifecycleStoreTest, ALinkThatCannotBeQuiescedIsNotHandedOver) {
  const std::string id = ready_kernel(request());
  link(0).refuse_quiesce = true;
  std::optional<std::vector<HandedOver>> handed;
  lifecycle->hand_over(std::chrono::seconds(5),
                       [&](std::vector<HandedOver> h) { handed = std::move(h); });
  run_until([&] { return handed.has_value(); });
  EXPECT_TRUE(handed->empty());
  EXPECT_TRUE(link(0).closed);
  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.handed_over, 0);
  EXPECT_FALSE(link(1).spec.handover.has_value());
  EXPECT_TRUE(has_progress(view(id), "the bridge restarted: re-attaching"));
}

TEST_F(LifecycleStoreTest, AJobThatEndedWhileTheBridgeWasDownGetsItsRealReasonOnceATokenComes) {
  const std::string id = ready_kernel(request());
  crash_and_restore();
  jobs.job().status = JobStatus::failed;
  jobs.job().status_message = "Slurm: DUE TO TIME LIMIT";
  clock.advance(std::chrono::seconds(60));  // the agent is gone: the link never comes up
  EXPECT_EQ(view(id).state, KernelState::reconnecting) << "not ended without the site's word";
  credentials.set("alice", "tok-fresh", std::nullopt);
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::walltime);
  EXPECT_NE(view(id).reason.find("DUE TO TIME LIMIT"), std::string::npos) << view(id).reason;
}

TEST_F(LifecycleStoreTest, AnAgentThatNeverAnswersEndsTheKernelAfterItsNoBridgeTimeout) {
  const std::string id = ready_kernel(request());
  crash_and_restore();
  clock.advance(std::chrono::seconds(599));
  EXPECT_EQ(view(id).state, KernelState::reconnecting);
  clock.advance(std::chrono::seconds(2));
  run_until_state(id, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::link_failed);
  EXPECT_NE(view(id).reason.find("did not answer within 600 s, its no-bridge timeout"),
            std::string::npos)
      << view(id).reason;
  EXPECT_NE(view(id).reason.find("without a UNICORE token of user alice"), std::string::npos);
  EXPECT_FALSE(link(1).listening) << "the hub-side ports are released";
}

TEST_F(LifecycleStoreTest, AQueuedKernelIsWatchedAgainAndStartsNormally) {
  const std::string id = create_ok(request());
  run_until([&] { return jobs.order.size() == 1; });
  jobs.job().status = JobStatus::queued;
  run_until_state(id, KernelState::queued);
  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.resumed, 1);
  EXPECT_EQ(view(id).state, KernelState::queued);
  credentials.set("alice", "tok-fresh", std::nullopt);
  jobs.job().status = JobStatus::running;
  jobs.job().files[kDiscoveryFile] = R"({"host": "10.0.0.7", "port": 40200, "hostname": "cn7"})";
  run_until_state(id, KernelState::connecting);
  ASSERT_TRUE(link(1).agent.has_value());
  EXPECT_EQ(link(1).agent->port, 40200);
  link(1).emit(hub_event::LinkUp{});
  link(1).emit(hub_event::KernelStarted{.pid = 5, .restart = false});
  run_until_state(id, KernelState::ready);
  EXPECT_EQ(jobs.order.size(), 1u);
}

TEST_F(LifecycleStoreTest, AKernelCaughtWhileItsJobWasBeingSubmittedEndsSayingSo) {
  const std::string id = create_ok(request());  // the job's URL has not come back yet
  EXPECT_TRUE(view(id).job_url.empty());
  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.ended, 1);
  EXPECT_EQ(view(id).state, KernelState::ended);
  EXPECT_EQ(view(id).end_cause, EndCause::internal);
  EXPECT_NE(view(id).reason.find("while it submitted"), std::string::npos) << view(id).reason;
  EXPECT_EQ(lifecycle->live_allocations(), 0u);
}

TEST_F(LifecycleStoreTest, EndedKernelsAreListedAgainAndReleasedAllocationsAreGone) {
  const std::string id = ready_kernel(request());
  const std::string second = ready_kernel(request(52000));
  bool done = false;
  lifecycle->remove(alice(), second, [&](std::optional<ServiceError>) { done = true; });
  run_until([&] { return done; });
  clock.advance(std::chrono::seconds(31));  // the restart grace runs out: released
  run_until([&] { return lifecycle->live_allocations() == 1; });
  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.kept_ended, 1);
  EXPECT_EQ(summary.reattaching, 1);
  EXPECT_EQ(summary.parked, 0);
  EXPECT_EQ(view(second).state, KernelState::ended);
  EXPECT_EQ(view(second).end_cause, EndCause::shutdown);
  EXPECT_EQ(view(id).state, KernelState::reconnecting);
  EXPECT_EQ(store->load().allocations.size(), 1u);
}

TEST_F(LifecycleStoreTest, DetachLeavesEveryKernelRunningForTheNextStart) {
  const std::string id = ready_kernel(request());
  lifecycle->detach();
  EXPECT_TRUE(link(0).closed);
  EXPECT_EQ(link(0).shutdowns, 0) << "the agent must keep its kernel";
  EXPECT_EQ(jobs.job().aborts, 0);
  EXPECT_EQ(view(id).state, KernelState::ready);
  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.reattaching, 1);
  EXPECT_EQ(view(id).state, KernelState::reconnecting);
}

TEST_F(LifecycleStoreTest, AParkedAllocationIsKeptForTheGraceThenItsAgentIsStopped) {
  const std::string id = ready_kernel(request());
  bool done = false;
  lifecycle->remove(alice(), id, [&](std::optional<ServiceError>) { done = true; });
  run_until([&] { return done; });
  const RestoreSummary summary = crash_and_restore();
  EXPECT_EQ(summary.parked, 1);
  link(1).emit(hub_event::LinkUp{});
  clock.advance(std::chrono::seconds(31));
  run_until([&] { return link(1).shutdowns == 1; });
}

TEST_F(LifecycleStoreTest, AnUnreadableRecordRefusesTheRestoreNamingTheKernelAndChangesNothing) {
  const std::string good = ready_kernel(request());
  store::KernelRecord bad;
  bad.id = "feedfacecafe";
  bad.owner = "alice";
  bad.site = "demo";
  bad.state = "ready";
  bad.view_json = R"({"id": "feedfacecafe", "state": 7})";
  store->put(bad);
  try {
    crash_and_restore();
    FAIL() << "restore accepted an unreadable record";
  } catch (const store::StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("kernel feedfacecafe"), std::string::npos) << e.what();
  }
  // Refused before anything was applied: the good kernel's record is as the old bridge left it.
  bool found = false;
  for (const auto& k : store->load().kernels) {
    if (k.id != good) continue;
    found = true;
    EXPECT_EQ(k.state, "ready");
  }
  EXPECT_TRUE(found);
  EXPECT_EQ(store->load().allocations.size(), 1u);
}

// A store whose disk is full: every write fails.
class FullDiskStore final : public store::Store {
 public:
  store::Snapshot load() override { return {}; }
  void put(const store::AllocationRecord&) override { fail(); }
  void put(const store::KernelRecord&) override { fail(); }
  void remove_allocation(const std::string&) override { fail(); }
  void remove_kernel(const std::string&) override { fail(); }
  std::string where() const override { return "sqlite /full/state.db"; }
  int writes = 0;

 private:
  void fail() {
    ++writes;
    throw store::StoreError("state database /full/state.db: database or disk is full");
  }
};

TEST_F(LifecycleTest, AStoreThatCannotBeWrittenLeavesKernelsRunningAndShowsInHealth) {
  FullDiskStore full;
  store = &full;
  make(std::chrono::seconds(30));
  const std::string id = ready_kernel(request());
  EXPECT_EQ(view(id).state, KernelState::ready);
  EXPECT_GT(full.writes, 0);
  bool seen = false;
  for (const auto& check : lifecycle->health()) {
    if (check.component != "state database sqlite /full/state.db") continue;
    seen = true;
    EXPECT_FALSE(check.ok);
    EXPECT_NE(check.detail.find("disk is full"), std::string::npos) << check.detail;
  }
  EXPECT_TRUE(seen);
  lifecycle.reset();
}

}  // namespace
}  // namespace kb::bridge
