#include "unicore/retry.hpp"

#include <algorithm>
#include <cmath>

namespace kb::unicore {

std::chrono::milliseconds RetryPolicy::delay(int retry, std::mt19937_64& rng) const {
  double base = static_cast<double>(initial_delay.count()) *
                std::pow(multiplier, static_cast<double>(std::max(0, retry - 1)));
  base = std::min(base, static_cast<double>(max_delay.count()));
  double j = std::clamp(jitter, 0.0, 1.0);
  std::uniform_real_distribution<double> factor(1.0 - j, 1.0 + j);
  double ms = base * factor(rng);
  return std::chrono::milliseconds(static_cast<long long>(std::max(0.0, std::round(ms))));
}

bool is_retryable(const HttpResponse& r, bool idempotent, bool unicore_error_body) {
  switch (r.error) {
    case TransportError::resolve:
    case TransportError::connect:
      return true;  // nothing reached the server
    case TransportError::tls:
      return false;  // certificate trouble is configuration; repeating it only delays the message
    case TransportError::timeout:
    case TransportError::send:
    case TransportError::receive:
    case TransportError::other:
      return idempotent || !r.request_sent;
    case TransportError::body_too_large:
      return false;  // the same request would get the same reply
    case TransportError::none:
      break;
  }
  switch (r.status) {
    case 503:
      if (!idempotent) return !unicore_error_body;
      return true;
    case 429:
    case 500:
    case 502:
    case 504:
      return idempotent;
    default:
      return false;
  }
}

}  // namespace kb::unicore
