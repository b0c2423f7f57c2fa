#include "unicore/job_watcher.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "unicore/client.hpp"

namespace kb::unicore {

// The range of one phase; growth below 1 would poll ever faster, so it counts as 1 (no growth).
kb::BackoffPolicy PollSchedule::phase(JobStatus status) const {
  auto range = [&](std::chrono::milliseconds initial, std::chrono::milliseconds max) {
    return kb::BackoffPolicy{initial, max, std::max(1.0, policy_.growth), kb::Jitter::proportional,
                             std::clamp(policy_.jitter, 0.0, 0.9)};
  };
  switch (status) {
    case JobStatus::queued:
      return range(policy_.queued_initial, policy_.queued_max);
    case JobStatus::running:
      return range(policy_.running_initial, policy_.running_max);
    default:
      return range(policy_.starting_initial, policy_.starting_max);
  }
}

// Failed polls double regardless of `growth`: a site in trouble is given room quickly.
kb::BackoffPolicy PollSchedule::errors() const {
  return {policy_.error_initial, policy_.error_max, 2.0, kb::Jitter::proportional,
          std::clamp(policy_.jitter, 0.0, 0.9)};
}

// The error range's stream is a second one derived from the seed, so one seed replays both.
PollSchedule::PollSchedule(WatchPolicy policy, std::uint64_t seed)
    : policy_(policy),
      polls_(phase(JobStatus::undefined), seed),
      errors_(errors(), seed ^ 0x5eed'e770'0000'0001ULL) {}

std::chrono::milliseconds PollSchedule::after_poll(JobStatus status) {
  errors_.reset();
  if (!status_ || *status_ != status) {
    status_ = status;
    polls_.reset(phase(status));
  }
  last_base_ = polls_.base(polls_.steps());
  return polls_.next();
}

std::chrono::milliseconds PollSchedule::after_error() {
  last_base_ = errors_.base(errors_.steps());
  return errors_.next();
}

JobWatcher::JobWatcher(Poll poll, std::unique_ptr<kb::Timer> timer, WatchHandlers handlers,
                       WatchPolicy policy, std::uint64_t seed)
    : poll_(std::move(poll)),
      timer_(std::move(timer)),
      handlers_(std::move(handlers)),
      schedule_(policy, seed) {}

std::shared_ptr<JobWatcher> JobWatcher::create(Poll poll, std::unique_ptr<kb::Timer> timer,
                                               WatchHandlers handlers, WatchPolicy policy,
                                               std::uint64_t seed) {
  return std::shared_ptr<JobWatcher>(
      new JobWatcher(std::move(poll), std::move(timer), std::move(handlers), policy, seed));
}

std::shared_ptr<JobWatcher> JobWatcher::create(UnicoreClient& client, boost::asio::io_context& io,
                                               Credentials creds, std::string job,
                                               WatchHandlers handlers, WatchPolicy policy) {
  Poll poll = [&client, creds = std::move(creds),
               job = std::move(job)](std::function<void(Result<JobInfo>)> done) {
    client.get_job(creds, job, std::move(done), {"status", "statusMessage", "exitCode"});
  };
  return create(std::move(poll), kb::make_asio_timer(io), std::move(handlers), policy);
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

// Runs inside poll_now's callback, which holds a shared_ptr: handlers may drop the caller's last
// one.
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
  bool changed =
      !last_status_ || *last_status_ != info.status || last_message_ != info.status_message;
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
