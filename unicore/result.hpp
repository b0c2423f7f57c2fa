#pragma once
// Error values for the UNICORE client's data path: every remote failure becomes an UnicoreError in
// a Result, never an exception. Plain values; usable from any thread.
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace kb::unicore {

enum class ErrorKind {
  refused,              // 401/403, or the site treats us as anonymous: credentials were refused
  not_found,            // 404: the job, file or site path does not exist
  server,               // any other HTTP error status (after retries for 5xx)
  timeout,              // no complete answer within the request timeout (after retries)
  connect,              // could not resolve or connect to the site (after retries)
  tls,                  // TLS handshake or certificate verification failed
  bad_reply,            // the site answered, but not with what the API promises
  submission_disabled,  // the site has switched job submission off (503 from POST jobs)
  invalid_argument,     // the caller asked for something malformed (bad job id, bad path, ...)
  cancelled,            // the operation was stopped by our side (client shut down)
};

const char* to_string(ErrorKind kind);

struct UnicoreError {
  ErrorKind kind = ErrorKind::server;
  int http_status = 0;         // 0 when no HTTP status was received
  std::string message;         // a complete sentence a person can act on (includes server_message)
  std::string server_message;  // the site's "errorMessage", verbatim, when it sent one
  std::string url;             // the request that failed
};

// Result<T>: either a T or an UnicoreError. Deliberately tiny (std::expected is C++23).
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  Result(UnicoreError error) : v_(std::in_place_index<1>, std::move(error)) {}

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const UnicoreError& error() const { return std::get<1>(v_); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, UnicoreError> v_;
};

// For operations whose success carries no value (abort, upload, ...).
struct Done {};
using Status = Result<Done>;

}  // namespace kb::unicore
