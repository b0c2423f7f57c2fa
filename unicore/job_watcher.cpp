#include "unicore/job_watcher.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cmath>

#include "unicore/client.hpp"

namespace kb::unicore {

namespace {

std::chrono::milliseconds grow(std::chrono::milliseconds initial, std::chrono::milliseconds max,
                               double growth, int steps) {
  double v = static_cast<double>(initial.count()) * std::pow(std::max(1.0, growth), std::min(steps, 64));
  v = std::min(v, static_cast<double>(max.count()));
  return std::chrono::milliseconds(static_cast<long long>(v));
}

class AsioWatchTimer final : public WatchTimer {
 public:
  explicit AsioWatchTimer(boost::asio::io_context& io) : timer_(io) {}
  ~AsioWatchTimer() override { timer_.cancel(); }
  void wait(std::chrono::milliseconds delay, std::function<void()> fire) override {
    timer_.expires_after(delay);
    timer_.async_wait([fire = std::move(fire)](const boost::system::error_code& ec) {
      if (!ec) fire();
    });
  }
  void cancel() override { timer_.cancel(); }

 private:
  boost::asio::steady_timer timer_;
};

}  // namespace

std::unique_ptr<WatchTimer> make_asio_watch_timer(boost::asio::io_context& io) {
  return std::make_unique<AsioWatchTimer>(io);
}

PollSchedule::PollSchedule(WatchPolicy policy, std::uint64_t seed) : policy_(policy), rng_(seed) {}

std::chrono::milliseconds PollSchedule::jittered(std::chrono::milliseconds base) {
  last_base_ = base;
  double j = std::clamp(policy_.jitter, 0.0, 0.9);
  std::uniform_real_distribution<double> factor(1.0 - j, 1.0 + j);
  return std::chrono::milliseconds(
      static_cast<long long>(std::round(static_cast<double>(base.count()) * factor(rng_))));
}

std::chrono::milliseconds PollSchedule::after_poll(JobStatus status) {
  errors_ = 0;
  if (status_ && *status_ == status) {
    ++unchanged_;
  } else {
    unchanged_ = 0;
    status_ = status;
  }
  switch (status) {
    case JobStatus::queued:
      return jittered(grow(policy_.queued_initial, policy_.queued_max, policy_.growth, unchanged_));
    case JobStatus::running:
      return jittered(grow(policy_.running_initial, policy_.running_max, policy_.growth, unchanged_));
    default:
      return jittered(grow(policy_.starting_initial, policy_.starting_max, policy_.growth, unchanged_));
  }
}

std::chrono::milliseconds PollSchedule::after_error() {
  auto d = jittered(grow(policy_.error_initial, policy_.error_max, 2.0, errors_));
  ++errors_;
  return d;
}

JobWatcher::JobWatcher(Poll poll, std::unique_ptr<WatchTimer> timer, WatchHandlers handlers,
                       WatchPolicy policy, std::uint64_t seed)
    : poll_(std::move(poll)), timer_(std::move(timer)), handlers_(std::move(handlers)),
      schedule_(policy, seed) {}

std::shared_ptr<JobWatcher> JobWatcher::create(Poll poll, std::unique_ptr<WatchTimer> timer,
                                               WatchHandlers handlers, WatchPolicy policy,
                                               std::uint64_t seed) {
  return std::shared_ptr<JobWatcher>(
      new JobWatcher(std::move(poll), std::move(timer), std::move(handlers), policy, seed));
}

std::shared_ptr<JobWatcher> JobWatcher::create(UnicoreClient& client, boost::asio::io_context& io,
                                               Credentials creds, std::string job,
                                               WatchHandlers handlers, WatchPolicy policy) {
  Poll poll = [&client, creds = std::move(creds), job = std::move(job)](
                  std::function<void(Result<JobInfo>)> done) {
    client.get_job(creds, job, std::move(done), {"status", "statusMessage", "exitCode"});
  };
  return create(std::move(poll), make_asio_watch_timer(io), std::move(handlers), policy);
}

void JobWatcher::start() {
  if (running_) return;
  running_ = true;
  poll_now();
}

void JobWatcher::stop() {
  running_ = false;
  timer_->cancel();
}

void JobWatcher::poll_now() {
  if (!running_ || in_flight_) return;
  in_flight_ = true;
  poll_([weak = weak_from_this()](Result<JobInfo> result) {
    auto self = weak.lock();
    if (!self) return;
    self->in_flight_ = false;
    if (!self->running_) return;
    self->on_result(std::move(result));
  });
}

// Runs inside poll_now's callback, which holds a shared_ptr: handlers may drop the caller's last one.
void JobWatcher::on_result(Result<JobInfo> result) {
  auto schedule_next = [this](std::chrono::milliseconds delay) {
    timer_->wait(delay, [weak = weak_from_this()] {
      if (auto self = weak.lock()) self->poll_now();
    });
  };
  if (!result) {
    const UnicoreError& e = result.error();
    bool fatal = e.kind == ErrorKind::refused || e.kind == ErrorKind::not_found ||
                 e.kind == ErrorKind::invalid_argument || e.kind == ErrorKind::tls;
    if (fatal) running_ = false;
    if (handlers_.on_error) handlers_.on_error(e, fatal);
    if (running_) schedule_next(schedule_.after_error());
    return;
  }
  const JobInfo& info = result.value();
  bool changed = !last_status_ || *last_status_ != info.status || last_message_ != info.status_message;
  last_status_ = info.status;
  last_message_ = info.status_message;
  if (changed && handlers_.on_change) handlers_.on_change(info);
  if (is_terminal(info.status)) {
    running_ = false;
    if (handlers_.on_end) handlers_.on_end(info);
    return;
  }
  if (running_) schedule_next(schedule_.after_poll(info.status));
}

}  // namespace kb::unicore
