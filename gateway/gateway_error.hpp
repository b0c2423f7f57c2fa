#pragma once
// The one error type of the gateway's protocol core: what was wrong with a message or a WebSocket
// frame, as a kind a caller can branch on and a sentence a log line can carry. Returned, never
// thrown: everything in gateway/ that reads outside input answers Result<T>.
#include <string>
#include <variant>

namespace kb::gateway {

enum class Fault {
  too_large,            // a part, a frame or a whole message above its limit
  malformed,            // the framing itself: delimiter, part count, offsets
  bad_json,             // a part that must be a JSON object is not
  bad_message,          // JSON of the wrong shape: a header without msg_id, buffers in a text frame
  bad_channel,          // no such channel, or one the client may not send on (iopub)
  missing_signature,    // a signing session received an empty signature
  bad_signature,        // the signature does not match (or is not 64 hex digits)
  duplicate_signature,  // a signature seen before: a replayed message
  crypto,               // OpenSSL failed to compute an HMAC
};
const char* to_string(Fault fault);

struct GatewayError {
  Fault fault;
  std::string message;  // printable; never quotes a key or a signature
};

template <class T>
using Result = std::variant<T, GatewayError>;

}  // namespace kb::gateway
