#pragma once
// The clock seam: what time it is and "call me after a delay", so code with leases, grace periods,
// timeouts and retries can be tested by advancing time instead of sleeping. AsioClock is real time
// on an io_context (production); ManualClock only moves when a test advances it.
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <utility>

namespace boost::asio {
class io_context;
}

namespace kb {

// One pending wait at a time. Who may call: the thread that runs the clock's callbacks (the
// io_context's thread for AsioClock, the test for ManualClock). The callback runs on that thread.
class Timer {
 public:
  virtual ~Timer() = default;
  // Calls `fire` once after `delay`, unless cancel(), another wait() or destruction comes first.
  virtual void wait(std::chrono::milliseconds delay, std::function<void()> fire) = 0;
  virtual void cancel() = 0;
};

// Who may call: the thread that runs its callbacks (see Timer). Must outlive its timers' waits.
class Clock {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual time_point now() const = 0;
  virtual std::unique_ptr<Timer> make_timer() = 0;
};

// A clock's Timer held by value, made from a clock as asio::steady_timer is from an io_context, so
// members that were steady_timers keep their shape. Who may call: as Timer.
class ClockTimer {
 public:
  explicit ClockTimer(Clock& clock) : timer_(clock.make_timer()) {}
  void wait(std::chrono::milliseconds delay, std::function<void()> fire) {
    timer_->wait(delay, std::move(fire));
  }
  void cancel() { timer_->cancel(); }

 private:
  std::unique_ptr<Timer> timer_;
};

// A Timer on a boost::asio::steady_timer (used where no Clock is passed around).
std::unique_ptr<Timer> make_asio_timer(boost::asio::io_context& io);

// Real time: std::chrono::steady_clock and Asio timers. Who may call: the io_context's thread.
class AsioClock final : public Clock {
 public:
  explicit AsioClock(boost::asio::io_context& io) : io_(io) {}
  time_point now() const override { return std::chrono::steady_clock::now(); }
  std::unique_ptr<Timer> make_timer() override { return make_asio_timer(io_); }

 private:
  boost::asio::io_context& io_;
};

// Test time: starts at an arbitrary fixed point and moves only in advance(). Due callbacks run
// inside advance(), in deadline order (ties in the order they were set), each with now() at its
// deadline. Given an io_context, advance() also runs the handlers that are ready on it (io.poll())
// before and after each callback, so work a callback posts (a fake backend's reply) happens at that
// instant too, as it would in real time. Who may call: the test's thread (which runs `io`).
class ManualClock final : public Clock {
 public:
  explicit ManualClock(boost::asio::io_context* io = nullptr);
  ~ManualClock() override;
  ManualClock(const ManualClock&) = delete;
  ManualClock& operator=(const ManualClock&) = delete;

  time_point now() const override { return now_; }
  std::unique_ptr<Timer> make_timer() override;

  // Moves time forward by `d`, running everything due on the way.
  void advance(std::chrono::milliseconds d);
  // When the earliest pending wait is due; nullopt when nothing waits.
  std::optional<time_point> next_deadline() const;
  std::size_t pending() const { return waits_.size(); }

 private:
  class ManualTimer;
  using Key = std::pair<time_point, std::uint64_t>;  // deadline, then order of setting
  struct Wait {
    ManualTimer* timer;
    std::function<void()> fire;
  };
  Key add(ManualTimer* timer, time_point at, std::function<void()> fire);
  void remove(const Key& key);
  void settle();

  boost::asio::io_context* io_;
  time_point now_{std::chrono::hours(24)};
  std::uint64_t order_ = 0;
  std::map<Key, Wait> waits_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kb
