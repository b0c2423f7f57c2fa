#include "common/backoff.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace kb {

namespace {

// SplitMix64's finaliser: neighbouring inputs (a seed and its sequence number) give unrelated
// outputs, so the derived seeds of one process share no structure.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::uint64_t read_process_seed() {
  if (const char* text = std::getenv(kBackoffSeedEnv); text && *text) {
    std::uint64_t seed = 0;
    const char* end = text + std::strlen(text);
    auto [ptr, ec] = std::from_chars(text, end, seed);
    if (ec == std::errc() && ptr == end) {
      spdlog::info("backoff seed {} (from {})", seed, kBackoffSeedEnv);
      return seed;
    }
    spdlog::warn("{}={} is not a decimal 64-bit number; using a random backoff seed instead",
                 kBackoffSeedEnv, text);
  }
  std::random_device rd;
  const std::uint64_t seed = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  spdlog::debug("backoff seed {} (set {}={} to replay these reconnect and retry delays)", seed,
                kBackoffSeedEnv, seed);
  return seed;
}

}  // namespace

Backoff::Backoff(BackoffPolicy policy, std::uint64_t seed) : policy_(policy), rng_(seed) {}

void Backoff::reset(BackoffPolicy policy) {
  policy_ = policy;
  steps_ = 0;
}

std::chrono::milliseconds Backoff::base(int step) const {
  double v = static_cast<double>(policy_.min.count()) *
             std::pow(policy_.growth, static_cast<double>(std::clamp(step, 0, 64)));
  v = std::min(v, static_cast<double>(policy_.max.count()));
  return std::chrono::milliseconds(static_cast<long long>(std::max(0.0, v)));
}

std::chrono::milliseconds Backoff::delay(int step) {
  const auto b = base(step);
  const long long ms = b.count();
  switch (policy_.jitter) {
    case Jitter::none:
      return b;
    case Jitter::full: {
      std::uniform_real_distribution<double> dist(0.0, static_cast<double>(ms));
      return std::chrono::milliseconds(static_cast<long long>(dist(rng_)));
    }
    case Jitter::equal: {
      const long long half = ms / 2;
      std::uniform_int_distribution<long long> dist(0, half);
      return std::chrono::milliseconds(half + dist(rng_));
    }
    case Jitter::proportional: {
      const double s = std::clamp(policy_.spread, 0.0, 1.0);
      std::uniform_real_distribution<double> factor(1.0 - s, 1.0 + s);
      const double v = std::round(static_cast<double>(ms) * factor(rng_));
      return std::chrono::milliseconds(static_cast<long long>(std::max(0.0, v)));
    }
  }
  return b;
}

std::chrono::milliseconds Backoff::next() {
  return delay(steps_++);
}

std::uint64_t process_backoff_seed() {
  static const std::uint64_t seed = read_process_seed();
  return seed;
}

std::uint64_t backoff_seed() {
  static std::atomic<std::uint64_t> sequence{0};
  return mix(process_backoff_seed() ^ mix(sequence.fetch_add(1, std::memory_order_relaxed)));
}

}  // namespace kb
