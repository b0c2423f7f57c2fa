#include "common/clock.hpp"

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <string>
#include <vector>

namespace kb {
namespace {

using std::chrono::milliseconds;

TEST(ManualClock, FiresOnlyWhenAdvancedPastTheDeadlineAtThatInstant) {
  ManualClock clock;
  const auto start = clock.now();
  auto t = clock.make_timer();
  std::vector<milliseconds> fired_at;
  t->wait(milliseconds(100), [&] {
    fired_at.push_back(std::chrono::duration_cast<milliseconds>(clock.now() - start));
  });
  clock.advance(milliseconds(99));
  EXPECT_TRUE(fired_at.empty());
  clock.advance(milliseconds(50));
  EXPECT_EQ(fired_at, std::vector<milliseconds>{milliseconds(100)});
  EXPECT_EQ(clock.now() - start, milliseconds(149));
  clock.advance(milliseconds(1000));
  EXPECT_EQ(fired_at.size(), 1u);  // once
}

TEST(ManualClock, RunsDueCallbacksInDeadlineOrderIncludingOnesSetOnTheWay) {
  ManualClock clock;
  auto a = clock.make_timer(), b = clock.make_timer(), c = clock.make_timer();
  std::vector<std::string> order;
  a->wait(milliseconds(30), [&] { order.push_back("a"); });
  b->wait(milliseconds(10), [&] {
    order.push_back("b");
    c->wait(milliseconds(5), [&] { order.push_back("c"); });  // due at 15, before a
  });
  clock.advance(milliseconds(40));
  EXPECT_EQ(order, (std::vector<std::string>{"b", "c", "a"}));
}

TEST(ManualClock, CancelRewaitAndDestructionDropTheWait) {
  ManualClock clock;
  int fired = 0;
  auto t = clock.make_timer();
  t->wait(milliseconds(10), [&] { fired += 1; });
  t->cancel();
  clock.advance(milliseconds(20));
  EXPECT_EQ(fired, 0);
  t->wait(milliseconds(10), [&] { fired += 10; });
  t->wait(milliseconds(30), [&] { fired += 100; });  // replaces the first
  clock.advance(milliseconds(20));
  EXPECT_EQ(fired, 0);
  clock.advance(milliseconds(10));
  EXPECT_EQ(fired, 100);
  t->wait(milliseconds(10), [&] { fired += 1000; });
  EXPECT_EQ(clock.pending(), 1u);
  t.reset();
  EXPECT_EQ(clock.pending(), 0u);
  clock.advance(milliseconds(20));
  EXPECT_EQ(fired, 100);
}

TEST(ManualClock, RunsPostedWorkAtTheInstantOfTheCallbackThatPostedIt) {
  boost::asio::io_context io;
  ManualClock clock(&io);
  const auto start = clock.now();
  auto t = clock.make_timer(), u = clock.make_timer();
  milliseconds reply_at{-1}, second_at{-1};
  t->wait(milliseconds(10), [&] {
    boost::asio::post(io, [&] {
      reply_at = std::chrono::duration_cast<milliseconds>(clock.now() - start);
      u->wait(milliseconds(5),
              [&] { second_at = std::chrono::duration_cast<milliseconds>(clock.now() - start); });
    });
  });
  clock.advance(milliseconds(100));
  EXPECT_EQ(reply_at, milliseconds(10));
  EXPECT_EQ(second_at, milliseconds(15));
}

TEST(ManualClock, TimersOutlivingTheClockAreHarmless) {
  auto clock = std::make_unique<ManualClock>();
  auto t = clock->make_timer();
  t->wait(milliseconds(10), [] {});
  clock.reset();
  t->cancel();
  t->wait(milliseconds(10), [] {});
  SUCCEED();  // no crash, no use of the destroyed clock (ASan would see it)
}

TEST(AsioClock, FiresAfterTheDelay) {
  boost::asio::io_context io;
  AsioClock clock(io);
  auto t = clock.make_timer();
  bool fired = false;
  const auto start = clock.now();
  t->wait(milliseconds(20), [&] { fired = true; });
  io.run_for(milliseconds(500));
  EXPECT_TRUE(fired);
  EXPECT_GE(clock.now() - start, milliseconds(20));
}

// Two timers due together: Asio queues both handlers before running the first, so a cancel from
// the first reaches a handler already queued. Cancel must still mean "does not fire".
TEST(AsioClock, CancelStopsAHandlerAsioHadAlreadyQueued) {
  boost::asio::io_context io;
  AsioClock clock(io);
  auto t = clock.make_timer(), u = clock.make_timer();
  int fired = 0;
  t->wait(milliseconds(5), [&] {
    ++fired;
    u->cancel();
  });
  u->wait(milliseconds(5), [&] {
    ++fired;
    t->cancel();
  });
  io.run_for(milliseconds(200));
  EXPECT_EQ(fired, 1);
}

}  // namespace
}  // namespace kb
