#pragma once
// When and how long to wait before repeating a failed UNICORE request. Pure; any thread.
#include <chrono>
#include <string>

#include "common/backoff.hpp"
#include "unicore/http_engine.hpp"

namespace kb::unicore {

struct RetryPolicy {
  int max_attempts = 4;  // including the first; 1 = never retry
  std::chrono::milliseconds initial_delay{250};
  double multiplier = 2.0;
  std::chrono::milliseconds max_delay{8'000};
  double jitter = 0.25;  // each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

  // The delays as a kb::Backoff range: the delay before retry number `retry` (1 = the first retry)
  // is backoff.delay(retry - 1): initial * multiplier^(retry-1), capped at max_delay, then jittered
  // (the jittered value never exceeds max_delay * (1 + jitter)).
  kb::BackoffPolicy backoff() const;
};

// Whether a failed exchange may be repeated.
// Transient: connection failures, timeouts, broken connections, HTTP 500/502/503/504 and 429.
// Never: TLS failures (configuration), bodies over the size cap, any other status.
// Non-idempotent requests (POST BASE/jobs, the job submission) are repeated only when that cannot
// create a second job: the request never left this host (resolve/connect failures, a connect
// timeout), or the server answered 503 with something that is not a UNICORE error document (a
// gateway or proxy turning us away before UNICORE saw the request). A timeout or 5xx after the
// request was sent may mean the job exists already, so it is reported instead — with a hint to
// list jobs — rather than risk two jobs (each one spending the user's budget).
// A UNICORE 503 on submission means "job submission disabled" and is reported at once.
bool is_retryable(const HttpResponse& response, bool idempotent, bool unicore_error_body);

}  // namespace kb::unicore
