#include "unicore/retry.hpp"

#include <gtest/gtest.h>

#include <set>

namespace kb::unicore {
namespace {

using std::chrono::milliseconds;

TEST(Retry, ExponentialWithJitterWithinBounds) {
  RetryPolicy p;
  p.initial_delay = milliseconds(100);
  p.multiplier = 2;
  p.max_delay = milliseconds(1000);
  p.jitter = 0.25;
  kb::Backoff rng(p.backoff(), 42);
  for (int round = 0; round < 200; ++round) {
    for (int retry = 1; retry <= 6; ++retry) {
      double base = std::min(100.0 * (1 << (retry - 1)), 1000.0);
      auto d = rng.delay(retry - 1).count();
      EXPECT_GE(d, base * 0.75 - 1) << retry;
      EXPECT_LE(d, base * 1.25 + 1) << retry;
    }
  }
}

TEST(Retry, JitterActuallyVaries) {
  RetryPolicy p;
  kb::Backoff rng(p.backoff(), 7);
  std::set<long long> seen;
  for (int i = 0; i < 20; ++i) seen.insert(rng.delay(0).count());
  EXPECT_GT(seen.size(), 5u);
  RetryPolicy none = p;
  none.jitter = 0;
  kb::Backoff none_rng(none.backoff(), 7);
  EXPECT_EQ(none_rng.delay(2), milliseconds(1000));
}

TEST(Retry, SameSeedSameDelays) {
  RetryPolicy p;
  kb::Backoff a(p.backoff(), 1), b(p.backoff(), 1);
  for (int i = 1; i < 5; ++i) EXPECT_EQ(a.delay(i - 1), b.delay(i - 1));
}

HttpResponse status(long s) {
  HttpResponse r;
  r.status = s;
  r.request_sent = true;
  return r;
}

HttpResponse transport(TransportError e, bool sent) {
  HttpResponse r;
  r.error = e;
  r.request_sent = sent;
  return r;
}

TEST(Retry, IdempotentRequestsRetryTransientFailures) {
  for (long s : {500, 502, 503, 504, 429}) EXPECT_TRUE(is_retryable(status(s), true, false)) << s;
  for (long s : {400, 401, 403, 404, 405, 415, 432, 501})
    EXPECT_FALSE(is_retryable(status(s), true, false)) << s;
  EXPECT_TRUE(is_retryable(transport(TransportError::connect, false), true, false));
  EXPECT_TRUE(is_retryable(transport(TransportError::timeout, true), true, false));
  EXPECT_TRUE(is_retryable(transport(TransportError::receive, true), true, false));
  EXPECT_FALSE(is_retryable(transport(TransportError::tls, false), true, false));
  EXPECT_FALSE(is_retryable(transport(TransportError::body_too_large, true), true, false));
}

TEST(Retry, SubmissionIsRetriedOnlyWhenNoSecondJobCanResult) {
  EXPECT_TRUE(is_retryable(transport(TransportError::connect, false), false, false));
  EXPECT_TRUE(is_retryable(transport(TransportError::timeout, false), false, false));
  EXPECT_FALSE(is_retryable(transport(TransportError::timeout, true), false, false));
  EXPECT_FALSE(is_retryable(transport(TransportError::receive, true), false, false));
  EXPECT_FALSE(is_retryable(status(500), false, false));
  EXPECT_FALSE(is_retryable(status(502), false, false));
  EXPECT_TRUE(
      is_retryable(status(503), false, /*unicore_error_body=*/false));  // proxy turned us away
  EXPECT_FALSE(
      is_retryable(status(503), false, /*unicore_error_body=*/true));  // submission disabled
}

}  // namespace
}  // namespace kb::unicore
