#include "unicore/job_watcher.hpp"

#include <gtest/gtest.h>

#include <deque>
#include <set>

namespace kb::unicore {
namespace {

using std::chrono::milliseconds;

WatchPolicy no_jitter() {
  WatchPolicy p;
  p.jitter = 0;
  return p;
}

TEST(PollSchedule, FastWhileStartingSlowerWhileQueued) {
  PollSchedule s(no_jitter(), 1);
  EXPECT_EQ(s.after_poll(JobStatus::ready), milliseconds(500));
  EXPECT_EQ(s.after_poll(JobStatus::ready), milliseconds(750));
  EXPECT_EQ(s.after_poll(JobStatus::ready), milliseconds(1125));
  for (int i = 0; i < 10; ++i) s.after_poll(JobStatus::stagingin);
  EXPECT_LE(s.after_poll(JobStatus::stagingin), milliseconds(2000));  // starting phases stay fast
  EXPECT_EQ(s.after_poll(JobStatus::queued), milliseconds(1000));
  milliseconds last{0};
  for (int i = 0; i < 20; ++i) {
    auto d = s.after_poll(JobStatus::queued);
    EXPECT_GE(d, last);  // backs off while nothing changes
    last = d;
  }
  EXPECT_EQ(last, milliseconds(20000));  // up to the bound
}

TEST(PollSchedule, FastAgainRightAfterTheJobStartsRunning) {
  PollSchedule s(no_jitter(), 1);
  for (int i = 0; i < 20; ++i) s.after_poll(JobStatus::queued);
  EXPECT_EQ(s.after_poll(JobStatus::running), milliseconds(500));
  for (int i = 0; i < 30; ++i) s.after_poll(JobStatus::running);
  EXPECT_EQ(s.after_poll(JobStatus::running), milliseconds(10000));
}

TEST(PollSchedule, JitterStaysWithinTheBoundsAndVaries) {
  WatchPolicy p;
  p.jitter = 0.2;
  PollSchedule s(p, 99);
  std::set<long long> seen;
  for (int i = 0; i < 50; ++i) {
    PollSchedule fresh(p, static_cast<std::uint64_t>(i));
    auto d = fresh.after_poll(JobStatus::queued);
    EXPECT_GE(d, milliseconds(800));
    EXPECT_LE(d, milliseconds(1200));
    seen.insert(d.count());
  }
  EXPECT_GT(seen.size(), 10u);
}

TEST(PollSchedule, ErrorsBackOffAndResetOnSuccess) {
  PollSchedule s(no_jitter(), 1);
  EXPECT_EQ(s.after_error(), milliseconds(2000));
  EXPECT_EQ(s.after_error(), milliseconds(4000));
  for (int i = 0; i < 10; ++i) s.after_error();
  EXPECT_EQ(s.after_error(), milliseconds(30000));
  s.after_poll(JobStatus::queued);
  EXPECT_EQ(s.after_error(), milliseconds(2000));
}

// A timer that only fires when the test says so, recording each requested delay.
class FakeTimer : public kb::Timer {
 public:
  struct Shared {
    std::vector<milliseconds> delays;
    std::function<void()> pending;
    int cancels = 0;
  };
  explicit FakeTimer(std::shared_ptr<Shared> s) : s_(std::move(s)) {}
  void wait(milliseconds delay, std::function<void()> fire) override {
    s_->delays.push_back(delay);
    s_->pending = std::move(fire);
  }
  void cancel() override {
    ++s_->cancels;
    s_->pending = nullptr;
  }

 private:
  std::shared_ptr<Shared> s_;
};

struct Harness {
  std::shared_ptr<FakeTimer::Shared> timer = std::make_shared<FakeTimer::Shared>();
  std::deque<Result<JobInfo>> answers;
  int polls = 0;
  std::vector<std::string> changes;
  std::vector<std::string> ends;
  std::vector<std::pair<ErrorKind, bool>> errors;
  std::shared_ptr<JobWatcher> watcher;

  void add(JobStatus s, std::string msg = "") {
    JobInfo j;
    j.status = s;
    j.status_message = std::move(msg);
    answers.emplace_back(j);
  }
  void add_error(ErrorKind k) { answers.emplace_back(UnicoreError{k, 0, "boom", "", ""}); }

  void make() {
    WatchHandlers h;
    h.on_change = [this](const JobInfo& j) {
      changes.push_back(to_string(j.status) +
                        (j.status_message.empty() ? "" : ":" + j.status_message));
    };
    h.on_end = [this](const JobInfo& j) { ends.push_back(j.failure_reason()); };
    h.on_error = [this](const UnicoreError& e, bool fatal) { errors.emplace_back(e.kind, fatal); };
    auto poll = [this](std::function<void(Result<JobInfo>)> done) {
      ++polls;
      ASSERT_FALSE(answers.empty()) << "polled more often than expected";
      auto a = std::move(answers.front());
      answers.pop_front();
      done(std::move(a));
    };
    watcher = JobWatcher::create(poll, std::make_unique<FakeTimer>(timer), h, no_jitter(), 1);
  }
  // Fires the pending timer; false when nothing is scheduled.
  bool tick() {
    if (!timer->pending) return false;
    auto f = std::move(timer->pending);
    timer->pending = nullptr;
    f();
    return true;
  }
};

TEST(JobWatcher, ReportsEachChangeOnceAndStopsAtTheEnd) {
  Harness h;
  h.add(JobStatus::ready);
  h.add(JobStatus::queued);
  h.add(JobStatus::queued);
  h.add(JobStatus::queued);
  h.add(JobStatus::running);
  h.add(JobStatus::running);
  h.add(JobStatus::failed, "Batch job 7 was terminated by the batch system: TIME LIMIT");
  h.make();
  h.watcher->start();
  while (h.tick()) {
  }
  EXPECT_EQ(h.polls, 7);
  EXPECT_EQ(h.changes, (std::vector<std::string>{
                           "READY", "QUEUED", "RUNNING",
                           "FAILED:Batch job 7 was terminated by the batch system: TIME LIMIT"}));
  EXPECT_EQ(h.ends,
            std::vector<std::string>{"Batch job 7 was terminated by the batch system: TIME LIMIT"});
  EXPECT_FALSE(h.watcher->running());
  EXPECT_EQ(h.timer->delays,
            (std::vector<milliseconds>{milliseconds(500), milliseconds(1000), milliseconds(1500),
                                       milliseconds(2250), milliseconds(500), milliseconds(750)}));
}

TEST(JobWatcher, TransientErrorsKeepWatchingFatalOnesStop) {
  Harness h;
  h.add(JobStatus::queued);
  h.add_error(ErrorKind::timeout);
  h.add(JobStatus::queued);
  h.add_error(ErrorKind::refused);
  h.make();
  h.watcher->start();
  while (h.tick()) {
  }
  EXPECT_EQ(h.polls, 4);
  ASSERT_EQ(h.errors.size(), 2u);
  EXPECT_EQ(h.errors[0], std::make_pair(ErrorKind::timeout, false));
  EXPECT_EQ(h.errors[1], std::make_pair(ErrorKind::refused, true));
  EXPECT_EQ(h.changes,
            std::vector<std::string>{"QUEUED"});      // the same status after an error is no change
  EXPECT_EQ(h.timer->delays[1], milliseconds(2000));  // error interval
  EXPECT_FALSE(h.watcher->running());
}

TEST(JobWatcher, StopCancelsTheTimerAndNoMorePollsHappen) {
  Harness h;
  h.add(JobStatus::queued);
  h.make();
  h.watcher->start();
  ASSERT_TRUE(h.timer->pending);
  h.watcher->stop();
  EXPECT_FALSE(h.tick());
  EXPECT_EQ(h.polls, 1);
  EXPECT_GE(h.timer->cancels, 1);
}

TEST(JobWatcher, AHandlerMayDropTheWatcher) {
  Harness h;
  h.add(JobStatus::successful);
  h.make();
  std::weak_ptr<JobWatcher> weak = h.watcher;
  bool ended = false;
  WatchHandlers handlers;
  std::shared_ptr<JobWatcher>* holder = &h.watcher;
  handlers.on_end = [&ended, holder](const JobInfo&) {
    ended = true;
    holder->reset();  // the owner lets go from inside the callback
  };
  auto poll = [&h](std::function<void(Result<JobInfo>)> done) {
    auto a = std::move(h.answers.front());
    h.answers.pop_front();
    done(std::move(a));
  };
  h.watcher =
      JobWatcher::create(poll, std::make_unique<FakeTimer>(h.timer), handlers, no_jitter(), 1);
  weak = h.watcher;
  h.watcher->start();
  EXPECT_TRUE(ended);
  EXPECT_TRUE(weak.expired());
}

}  // namespace
}  // namespace kb::unicore
