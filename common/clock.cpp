#include "common/clock.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

namespace kb {

namespace {

class AsioTimer final : public Timer {
 public:
  explicit AsioTimer(boost::asio::io_context& io) : timer_(io) {}
  ~AsioTimer() override { cancel(); }

  void wait(std::chrono::milliseconds delay, std::function<void()> fire) override {
    const std::uint64_t mine = ++*generation_;
    timer_.expires_after(delay);  // cancels a pending wait
    timer_.async_wait([generation = generation_, mine,
                       fire = std::move(fire)](const boost::system::error_code& ec) {
      // A handler Asio had already queued when cancel() came does not fire: cancel means cancel.
      if (!ec && *generation == mine) fire();
    });
  }
  void cancel() override {
    ++*generation_;
    timer_.cancel();
  }

 private:
  boost::asio::steady_timer timer_;
  std::shared_ptr<std::uint64_t> generation_ = std::make_shared<std::uint64_t>(0);
};

}  // namespace

std::unique_ptr<Timer> make_asio_timer(boost::asio::io_context& io) {
  return std::make_unique<AsioTimer>(io);
}

class ManualClock::ManualTimer final : public Timer {
 public:
  explicit ManualTimer(ManualClock& clock) : clock_(clock), clock_alive_(clock.alive_) {}
  ~ManualTimer() override { cancel(); }

  void wait(std::chrono::milliseconds delay, std::function<void()> fire) override {
    cancel();
    if (clock_alive_.expired()) return;
    key_ = clock_.add(this, clock_.now_ + delay, std::move(fire));
  }
  void cancel() override {
    if (key_ && !clock_alive_.expired()) clock_.remove(*key_);
    key_.reset();
  }

 private:
  friend class ManualClock;
  ManualClock& clock_;
  std::weak_ptr<bool> clock_alive_;
  std::optional<Key> key_;
};

ManualClock::ManualClock(boost::asio::io_context* io) : io_(io) {}

ManualClock::~ManualClock() {
  alive_.reset();
}

std::unique_ptr<Timer> ManualClock::make_timer() {
  return std::make_unique<ManualTimer>(*this);
}

ManualClock::Key ManualClock::add(ManualTimer* timer, time_point at, std::function<void()> fire) {
  Key key{at, order_++};
  waits_.emplace(key, Wait{timer, std::move(fire)});
  return key;
}

void ManualClock::remove(const Key& key) {
  waits_.erase(key);
}

std::optional<ManualClock::time_point> ManualClock::next_deadline() const {
  if (waits_.empty()) return std::nullopt;
  return waits_.begin()->first.first;
}

void ManualClock::settle() {
  if (!io_) return;
  io_->restart();
  io_->poll();
}

void ManualClock::advance(std::chrono::milliseconds d) {
  const time_point target = now_ + d;
  settle();
  while (!waits_.empty() && waits_.begin()->first.first <= target) {
    auto node = waits_.extract(waits_.begin());
    node.mapped().timer->key_.reset();
    now_ = node.key().first;
    node.mapped().fire();
    settle();
  }
  now_ = target;
  settle();
}

}  // namespace kb
