#include "unicore/retry.hpp"

namespace kb::unicore {

kb::BackoffPolicy RetryPolicy::backoff() const {
  return {initial_delay, max_delay, multiplier, kb::Jitter::proportional, jitter};
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
