#pragma once
// A Jupyter message in its ZeroMQ multipart form (jupyter_client session.py, "the wire protocol"):
//   [routing identities…] "<IDS|MSG>" signature header parent_header metadata content [buffers…]
// The signature is the lowercase hex HMAC-SHA256, keyed with the kernel's connection-file key,
// over the four JSON parts exactly as sent. Parts are kept as the bytes on the wire, so a message
// relayed unchanged is verified over exactly what the kernel wrote. Rules: docs/gateway.md.
// Pure data code: callable from any thread; a MessageSigner is immutable once made, a
// SignatureHistory belongs to one caller at a time.
#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "gateway/gateway_error.hpp"

namespace kb::gateway {

inline constexpr std::string_view kDelimiter = "<IDS|MSG>";
inline constexpr std::string_view kSignatureScheme = "hmac-sha256";  // the only one supported
inline constexpr std::size_t kSignatureHexSize = 64;

struct JupyterMessage {
  std::vector<std::string> identities;  // ZeroMQ routing ids before the delimiter
  std::string header = "{}";            // the four JSON parts, as bytes
  std::string parent_header = "{}";
  std::string metadata = "{}";
  std::string content = "{}";
  std::vector<std::string> buffers;  // raw binary parts after content

  std::size_t size() const;  // bytes of every part, identities included
};

// Bounds on what parse() accepts: one message may not make the gateway hold more than max_total.
struct MessageLimits {
  std::size_t max_total = 32 * 1024 * 1024;
  std::size_t max_part = 32 * 1024 * 1024;
  std::size_t max_identities = 16;
  std::size_t max_identity = 255;  // ZeroMQ routing ids are at most 255 bytes
  std::size_t max_buffers = 1024;
};

// Signs and verifies with one kernel's key. An empty key is an unsigned session, as in
// jupyter_client (Session(key=b"")): sign() gives "", verify() accepts any signature.
class MessageSigner {
 public:
  // `scheme` is the connection file's signature_scheme; only "hmac-sha256" is accepted.
  static Result<MessageSigner> create(std::string key, std::string_view scheme = kSignatureScheme);

  bool signs() const { return !key_.empty(); }
  // The hex signature of the message's four JSON parts.
  Result<std::string> sign(const JupyterMessage& message) const;
  // Compares `signature` with the message's in constant time (the length is not secret).
  // missing_signature, bad_signature or crypto on failure; nothing on success.
  std::optional<GatewayError> verify(const JupyterMessage& message,
                                     std::string_view signature) const;

 private:
  explicit MessageSigner(std::string key) : key_(std::move(key)) {}
  std::string key_;
};

// The signatures a receiving session has accepted, so a replayed message is refused
// (jupyter_client keeps 2^16 and refuses "Duplicate Signature"). Forgets the oldest beyond
// `capacity` (0: remembers nothing); about 80 bytes per remembered signature. One owner at a time.
class SignatureHistory {
 public:
  using Digest = std::array<std::uint8_t, 32>;
  explicit SignatureHistory(std::size_t capacity = 65536) : capacity_(capacity) {}
  // False if `digest` was remembered before; otherwise remembers it.
  bool remember(const Digest& digest);
  std::size_t size() const { return order_.size(); }

 private:
  struct Hash {
    std::size_t operator()(const Digest& d) const;
  };
  std::size_t capacity_;
  std::unordered_set<Digest, Hash> seen_;
  std::deque<const Digest*> order_;  // oldest first; set elements do not move on rehash
};

// The multipart form, signed: identities, delimiter, signature, the four parts, buffers.
Result<std::vector<std::string>> serialize(const JupyterMessage& message,
                                           const MessageSigner& signer);

// Reads a multipart message: finds the delimiter, checks the limits, verifies the signature (and,
// with a `history`, refuses a replay), then checks that the four parts are JSON objects and the
// header names msg_id and msg_type. Errors say which part and why, never quoting content.
Result<JupyterMessage> parse(std::span<const std::string> parts, const MessageSigner& signer,
                             SignatureHistory* history = nullptr, const MessageLimits& limits = {});

// What the gateway reads from a header: enough to route and to log.
struct HeaderFields {
  std::string msg_id;
  std::string msg_type;
  std::string session;  // "" if absent
};
// `header` must pass is_json_object and have string msg_id and msg_type (session optional, a
// string).
Result<HeaderFields> read_header(std::string_view header);
// Whether `text` is one JSON object (RFC 8259, UTF-8, so no raw NUL byte) nested at most
// kMaxJsonDepth deep, checked without building it.
bool is_json_object(std::string_view text);

// Arrays and objects nest at most this deep in any part the gateway accepts: printing a parsed
// value recurses, so a 16 MiB "[[[[…" must not reach it. Jupyter's own messages nest a few levels.
inline constexpr std::size_t kMaxJsonDepth = 256;
// (kb::json_depth_within in common/text.hpp checks it.)

}  // namespace kb::gateway
