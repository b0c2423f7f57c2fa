#pragma once
// LinkHandshake: the mutual challenge-response on one candidate transport, as a pure state machine
// (frames in, frames out, no I/O, no clock) so it can be tested and fuzzed directly. The bridge
// sends HELLO, the agent answers CHALLENGE (with its proof), the bridge answers RESPONSE (its
// proof). Proofs are HMAC-SHA256(secret, role label || HELLO payload || CHALLENGE payload without
// proof): fresh nonces from both sides, both session identities and the protocol version are
// bound, and the role label makes a reflected proof useless. The secret never leaves this object.
// Used by LinkSession on its io_context thread (any single thread in tests and fuzzers).
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "link/frame.hpp"

namespace kb::tunnel {

using SessionId = std::array<std::uint8_t, frame::kSessionIdSize>;

class LinkHandshake {
 public:
  enum class Role : std::uint8_t { bridge = 0, agent = 1 };
  enum class Status { in_progress, authenticated, failed };

  struct Result {
    SessionId peer_session{};   // the peer's own session identity
    SessionId peer_knows_me{};  // what the peer believes my identity is (all zero: none)
    std::uint32_t peer_window = 0;
  };

  // `nonce` must be kNonceSize fresh random bytes (LinkSession uses auth::random_bytes; tests and
  // fuzzers may pass fixed values).
  LinkHandshake(Role role, std::span<const std::uint8_t> secret, SessionId self,
                SessionId known_peer, std::uint32_t window, std::span<const std::uint8_t> nonce);

  // Bridge: appends HELLO to `out`. Agent: nothing (it waits for HELLO).
  void start(std::vector<std::uint8_t>& out);
  // Feeds one decoded frame (any type). Frames to send are appended to `out`. Once `failed`, the
  // reason is in error() and further calls keep returning failed.
  Status on_frame(const frame::DecodedFrame& frame, std::vector<std::uint8_t>& out);
  ~LinkHandshake();  // wipes its copy of the secret
  LinkHandshake(const LinkHandshake&) = delete;
  LinkHandshake& operator=(const LinkHandshake&) = delete;

  Status status() const { return status_; }
  const std::string& error() const { return error_; }
  const Result& result() const { return result_; }

 private:
  Status fail(std::string reason);
  std::array<std::uint8_t, frame::kProofSize> proof(Role prover) const;
  void encode_hello(std::uint8_t* out, Role as) const;

  Role role_;
  std::vector<std::uint8_t> secret_;
  SessionId self_;
  SessionId known_peer_;
  std::uint32_t window_;
  std::array<std::uint8_t, frame::kNonceSize> nonce_{};
  // The transcript the proofs cover: HELLO payload || CHALLENGE payload without proof.
  std::array<std::uint8_t, frame::kHelloSize * 2> transcript_{};
  enum class Step { initial, sent_hello, sent_challenge, done } step_ = Step::initial;
  Status status_ = Status::in_progress;
  std::string error_;
  Result result_;
};

}  // namespace kb::tunnel
