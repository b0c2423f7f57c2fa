#include "common/backoff.hpp"

#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <set>
#include <vector>

namespace kb {
namespace {

using std::chrono::milliseconds;

BackoffPolicy policy(Jitter jitter, double spread = 0) {
  BackoffPolicy p;
  p.min = milliseconds(100);
  p.max = milliseconds(1000);
  p.growth = 2.0;
  p.jitter = jitter;
  p.spread = spread;
  return p;
}

TEST(Backoff, BaseGrowsFromMinAndStopsAtMax) {
  Backoff b(policy(Jitter::none), 1);
  EXPECT_EQ(b.base(0), milliseconds(100));
  EXPECT_EQ(b.base(1), milliseconds(200));
  EXPECT_EQ(b.base(3), milliseconds(800));
  EXPECT_EQ(b.base(4), milliseconds(1000));
  EXPECT_EQ(b.base(1000), milliseconds(1000));  // no overflow far past the cap
  EXPECT_EQ(b.base(-1), milliseconds(100));
  BackoffPolicy slow = policy(Jitter::none);
  slow.growth = 1.5;
  Backoff s(slow, 1);
  EXPECT_EQ(s.base(2), milliseconds(225));
  EXPECT_EQ(s.base(3), milliseconds(337));  // whole milliseconds, truncated
}

TEST(Backoff, NextWalksTheStepsAndResetStartsOver) {
  Backoff b(policy(Jitter::none), 1);
  EXPECT_EQ(b.next(), milliseconds(100));
  EXPECT_EQ(b.next(), milliseconds(200));
  EXPECT_EQ(b.next(), milliseconds(400));
  EXPECT_EQ(b.steps(), 3);
  b.reset();
  EXPECT_EQ(b.steps(), 0);
  EXPECT_EQ(b.next(), milliseconds(100));
  BackoffPolicy other = policy(Jitter::none);
  other.min = milliseconds(7);
  b.reset(other);
  EXPECT_EQ(b.next(), milliseconds(7));
  EXPECT_EQ(b.next(), milliseconds(14));
}

TEST(Backoff, FullJitterCoversZeroToTheBase) {
  Backoff b(policy(Jitter::full), 42);
  std::set<long long> seen;
  long long lowest = 1'000'000, highest = 0;
  for (int i = 0; i < 2000; ++i) {
    long long d = b.delay(3).count();  // base 800
    ASSERT_GE(d, 0);
    ASSERT_LE(d, 800);
    lowest = std::min(lowest, d);
    highest = std::max(highest, d);
    seen.insert(d);
  }
  EXPECT_LT(lowest, 100);   // reaches near zero: the point of full jitter
  EXPECT_GT(highest, 700);  // and near the base
  EXPECT_GT(seen.size(), 200u);
}

TEST(Backoff, EqualJitterKeepsHalfTheBase) {
  Backoff b(policy(Jitter::equal), 42);
  std::set<long long> seen;
  for (int i = 0; i < 500; ++i) {
    auto d = b.delay(2).count();  // base 400
    ASSERT_GE(d, 200);
    ASSERT_LE(d, 400);
    seen.insert(d);
  }
  EXPECT_GT(seen.size(), 50u);
}

TEST(Backoff, ProportionalJitterStaysWithinTheSpread) {
  Backoff b(policy(Jitter::proportional, 0.25), 42);
  std::set<long long> seen;
  for (int i = 0; i < 500; ++i) {
    auto d = b.delay(1).count();  // base 200
    ASSERT_GE(d, 150);
    ASSERT_LE(d, 250);
    seen.insert(d);
  }
  EXPECT_GT(seen.size(), 30u);
  Backoff wide(policy(Jitter::proportional, 5.0), 42);  // clamped to 1: never negative
  for (int i = 0; i < 500; ++i) {
    auto d = wide.delay(1).count();
    ASSERT_GE(d, 0);
    ASSERT_LE(d, 400);
  }
}

TEST(Backoff, NoJitterIsExact) {
  Backoff b(policy(Jitter::proportional, 0), 42);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(b.delay(2), milliseconds(400));
}

// The replay promise: the same seed gives the same delays, another seed other delays.
TEST(Backoff, SameSeedReplaysOtherSeedDiffers) {
  for (Jitter j : {Jitter::full, Jitter::equal, Jitter::proportional}) {
    Backoff a(policy(j, 0.5), 7), b(policy(j, 0.5), 7), c(policy(j, 0.5), 8);
    std::vector<long long> da, db, dc;
    for (int i = 0; i < 20; ++i) {
      da.push_back(a.next().count());
      db.push_back(b.next().count());
      dc.push_back(c.next().count());
    }
    EXPECT_EQ(da, db);
    EXPECT_NE(da, dc);
  }
}

TEST(Backoff, DerivedSeedsDifferSoInstancesDoNotRetryInLockstep) {
  std::set<std::uint64_t> seeds;
  for (int i = 0; i < 100; ++i) seeds.insert(backoff_seed());
  EXPECT_EQ(seeds.size(), 100u);
  EXPECT_EQ(process_backoff_seed(), process_backoff_seed());  // fixed for the process
}

// KB_BACKOFF_SEED fixes the process seed, so a second run with the logged seed gets the same
// delays. Each check runs in a fresh process (the seed is read once per process): the
// "threadsafe" death-test style re-executes this binary for the child.
TEST(BackoffDeathTest, TheEnvironmentSeedReplaysAcrossProcesses) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  ::setenv(kBackoffSeedEnv, "12345", 1);
  auto first_delay = [] {
    Backoff b(BackoffPolicy{milliseconds(100), milliseconds(100), 2.0, Jitter::full, 0},
              backoff_seed());
    std::exit(process_backoff_seed() == 12345 ? static_cast<int>(b.delay(0).count()) : 101);
  };
  int first = -1, second = -2;
  EXPECT_EXIT(
      first_delay(),
      [&](int status) {
        first = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return true;
      },
      "");
  EXPECT_EXIT(
      first_delay(),
      [&](int status) {
        second = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return true;
      },
      "");
  ::unsetenv(kBackoffSeedEnv);
  EXPECT_NE(first, 101) << "the environment's seed was not used";
  EXPECT_GE(first, 0);
  EXPECT_EQ(first, second);
}

}  // namespace
}  // namespace kb
