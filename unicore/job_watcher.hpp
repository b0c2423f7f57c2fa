#pragma once
// Follows a UNICORE job's status by polling GET job?fields=status,statusMessage,exitCode at an
// adaptive, jittered interval: fast while the job is starting (READY, STAGINGIN) and right after it
// starts RUNNING, backing off while it waits in the batch queue (QUEUED) and while it runs
// steadily.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "common/backoff.hpp"
#include "common/clock.hpp"
#include "unicore/credentials.hpp"
#include "unicore/replies.hpp"
#include "unicore/result.hpp"

namespace boost::asio {
class io_context;
}

namespace kb::unicore {

class UnicoreClient;

struct WatchPolicy {
  // Starting phases (UNDEFINED, READY, STAGINGIN, STAGINGOUT): the next step comes within seconds.
  std::chrono::milliseconds starting_initial{500};
  std::chrono::milliseconds starting_max{2'000};
  // QUEUED can last hours; the batch system decides, polling faster does not help.
  std::chrono::milliseconds queued_initial{1'000};
  std::chrono::milliseconds queued_max{20'000};
  // RUNNING: fast at first (the bridge connects now), then only watching for the end.
  std::chrono::milliseconds running_initial{500};
  std::chrono::milliseconds running_max{10'000};
  // After a failed poll (site unreachable, 5xx after the client's own retries).
  std::chrono::milliseconds error_initial{2'000};
  std::chrono::milliseconds error_max{30'000};
  double growth = 1.5;  // interval factor per poll without change
  double jitter = 0.2;  // each interval scaled by a random factor in [1 - jitter, 1 + jitter]
};

// The interval logic, without timers: pure and deterministic for a given seed. Any thread.
class PollSchedule {
 public:
  explicit PollSchedule(WatchPolicy policy = {}, std::uint64_t seed = kb::backoff_seed());
  // Delay before the next poll, after a poll that saw `status`.
  std::chrono::milliseconds after_poll(JobStatus status);
  // Delay before the next poll, after a poll that failed.
  std::chrono::milliseconds after_error();
  // The same without jitter (what the jitter is applied to), for tests and logs.
  std::chrono::milliseconds last_base() const { return last_base_; }

 private:
  kb::BackoffPolicy phase(JobStatus status) const;
  kb::BackoffPolicy errors() const;
  WatchPolicy policy_;
  // Polls that saw the same status in a row walk one phase's range; any change starts the new
  // status's range afresh. Failed polls walk their own range, reset by the next answer.
  kb::Backoff polls_;
  kb::Backoff errors_;
  std::optional<JobStatus> status_;
  std::chrono::milliseconds last_base_{0};
};

struct WatchHandlers {
  std::function<void(const JobInfo&)> on_change;  // first poll, then every status/message change
  std::function<void(const JobInfo&)> on_end;     // SUCCESSFUL or FAILED; watching stops
  // A failed poll. fatal (credentials refused, job gone, bad request): watching stops. Otherwise
  // the watcher keeps trying at the error interval.
  std::function<void(const UnicoreError&, bool fatal)> on_error;
};

// Who may call: the thread that runs the timer's (and the client's) io_context. Handlers run there.
// Polling stops on stop(), at the job's end, on a fatal error, or when the last shared_ptr goes.
class JobWatcher : public std::enable_shared_from_this<JobWatcher> {
 public:
  using Poll = std::function<void(std::function<void(Result<JobInfo>)>)>;

  // `timer`: the clock seam's (kb::Clock::make_timer(); a fake in tests).
  static std::shared_ptr<JobWatcher> create(Poll poll, std::unique_ptr<kb::Timer> timer,
                                            WatchHandlers handlers, WatchPolicy policy = {},
                                            std::uint64_t seed = kb::backoff_seed());
  // Watches `job` through `client` (which must outlive the watcher) with Asio timers.
  static std::shared_ptr<JobWatcher> create(UnicoreClient& client, boost::asio::io_context& io,
                                            Credentials creds, std::string job,
                                            WatchHandlers handlers, WatchPolicy policy = {});

  void start();  // polls at once
  void stop();
  bool running() const { return running_; }

 private:
  JobWatcher(Poll poll, std::unique_ptr<kb::Timer> timer, WatchHandlers handlers,
             WatchPolicy policy, std::uint64_t seed);
  void poll_now();
  void on_result(Result<JobInfo> result);

  Poll poll_;
  std::unique_ptr<kb::Timer> timer_;
  WatchHandlers handlers_;
  PollSchedule schedule_;
  bool running_ = false;
  bool in_flight_ = false;
  std::optional<JobStatus> last_status_;
  std::string last_message_;
};

}  // namespace kb::unicore
