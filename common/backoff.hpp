#pragma once
// Exponential backoff with jitter, from an explicit seed, so a run's delays can be replayed.
// Every retry loop in the bridge (SSH reconnects, a kernel's link, UNICORE requests, job polling)
// uses this one type; each keeps its own range and jitter style.
#include <chrono>
#include <cstdint>
#include <random>

namespace kb {

enum class Jitter {
  none,          // exactly the base delay
  full,          // uniform in [0, base]: many clients that failed together spread out the most
  equal,         // base/2 + uniform in [0, base/2]: spread out, but never back-to-back
  proportional,  // base scaled by a factor uniform in [1 - spread, 1 + spread]
};

struct BackoffPolicy {
  std::chrono::milliseconds min{0};  // the first delay's base
  std::chrono::milliseconds max{0};  // the base never grows past this (max wins over min)
  double growth = 2.0;               // base factor per step
  Jitter jitter = Jitter::full;
  double spread = 0.0;  // Jitter::proportional only; clamped to [0, 1]
};

// Who may call: one owner at a time (not thread-safe); any thread. Pure apart from its random
// stream.
class Backoff {
 public:
  Backoff(BackoffPolicy policy, std::uint64_t seed);

  // Base of the step-th delay (0 = the first): min * growth^step, capped at max, whole
  // milliseconds.
  std::chrono::milliseconds base(int step) const;
  // The step-th delay, jittered; for callers that count their own attempts (per request, per
  // connection). Advances the random stream, not steps().
  std::chrono::milliseconds delay(int step);
  // The next delay in this object's own sequence: delay(steps()), then steps() grows by one.
  std::chrono::milliseconds next();
  // After a success: next() starts again at min.
  void reset() { steps_ = 0; }
  // Starts again with another range, keeping the random stream (one seed for a caller's phases).
  void reset(BackoffPolicy policy);
  int steps() const { return steps_; }
  const BackoffPolicy& policy() const { return policy_; }

 private:
  BackoffPolicy policy_;
  std::mt19937_64 rng_;
  int steps_ = 0;
};

// Seed for a new production Backoff. All derive from one process-wide seed: KB_BACKOFF_SEED from
// the environment when set (a decimal std::uint64_t), otherwise random; it is logged once, at debug
// level, so a failure's delays can be replayed by starting the process again with that seed. The
// n-th call in a process gets the same value for the same process seed, so a replay reproduces
// delays when the process creates its connections and kernels in the same order. Any thread.
std::uint64_t backoff_seed();

// The process-wide seed itself (read and logged on first use). Any thread.
std::uint64_t process_backoff_seed();

// The environment variable that fixes the process-wide seed.
inline constexpr const char* kBackoffSeedEnv = "KB_BACKOFF_SEED";

}  // namespace kb
