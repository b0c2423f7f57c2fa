#include "link/handshake.hpp"

#include <openssl/crypto.h>

#include <cstring>

#include "auth/secret.hpp"

namespace kb::tunnel {

namespace {

constexpr char kAgentLabel[] = "kernel-bridge link v1: agent proof";
constexpr char kBridgeLabel[] = "kernel-bridge link v1: bridge proof";
constexpr std::uint32_t kMinWindow = 1024;
constexpr std::uint32_t kMaxWindow = 1u << 30;

// Offsets inside a HELLO / CHALLENGE payload.
constexpr std::size_t kOffVersion = 0, kOffRole = 2, kOffReserved = 3, kOffWindow = 4,
                      kOffSession = 8, kOffKnown = 8 + frame::kSessionIdSize,
                      kOffNonce = 8 + 2 * frame::kSessionIdSize;

const char* role_name(LinkHandshake::Role r) {
  return r == LinkHandshake::Role::bridge ? "bridge" : "agent";
}

}  // namespace

LinkHandshake::LinkHandshake(Role role, std::span<const std::uint8_t> secret, SessionId self,
                             SessionId known_peer, std::uint32_t window,
                             std::span<const std::uint8_t> nonce)
    : role_(role),
      secret_(secret.begin(), secret.end()),
      self_(self),
      known_peer_(known_peer),
      window_(window) {
  std::memcpy(nonce_.data(), nonce.data(), std::min(nonce.size(), nonce_.size()));
}

LinkHandshake::~LinkHandshake() {
  OPENSSL_cleanse(secret_.data(), secret_.size());
}

void LinkHandshake::encode_hello(std::uint8_t* out, Role as) const {
  frame::put_u16(out + kOffVersion, frame::kProtocolVersion);
  out[kOffRole] = static_cast<std::uint8_t>(as);
  out[kOffReserved] = 0;
  frame::put_u32(out + kOffWindow, window_);
  std::memcpy(out + kOffSession, self_.data(), self_.size());
  std::memcpy(out + kOffKnown, known_peer_.data(), known_peer_.size());
  std::memcpy(out + kOffNonce, nonce_.data(), nonce_.size());
}

std::array<std::uint8_t, frame::kProofSize> LinkHandshake::proof(Role prover) const {
  const char* label = prover == Role::agent ? kAgentLabel : kBridgeLabel;
  const std::size_t label_len = std::strlen(label);
  std::vector<std::uint8_t> input(label_len + transcript_.size());
  std::memcpy(input.data(), label, label_len);
  std::memcpy(input.data() + label_len, transcript_.data(), transcript_.size());
  return kb::auth::hmac_sha256(secret_, input);
}

LinkHandshake::Status LinkHandshake::fail(std::string reason) {
  status_ = Status::failed;
  error_ = std::move(reason);
  step_ = Step::done;
  return status_;
}

void LinkHandshake::start(std::vector<std::uint8_t>& out) {
  if (role_ != Role::bridge || step_ != Step::initial) return;
  encode_hello(transcript_.data(), Role::bridge);
  frame::append_frame(out, frame::FrameType::hello, 0, 0,
                      std::span<const std::uint8_t>(transcript_.data(), frame::kHelloSize));
  step_ = Step::sent_hello;
}

LinkHandshake::Status LinkHandshake::on_frame(const frame::DecodedFrame& f,
                                              std::vector<std::uint8_t>& out) {
  using frame::FrameType;
  if (status_ != Status::in_progress) return status_;
  const auto& h = f.header;
  if (h.type == FrameType::goodbye) {
    return fail("peer refused the link: " +
                std::string(reinterpret_cast<const char*>(f.payload.data()), f.payload.size()));
  }
  // Parses the fields common to HELLO and CHALLENGE and checks version, role and window.
  auto check_hello = [&](Role expected_role) -> std::string {
    const std::uint8_t* p = f.payload.data();
    const auto version = frame::get_u16(p + kOffVersion);
    if (version != frame::kProtocolVersion) {
      return "peer speaks link protocol version " + std::to_string(version) + ", this side " +
             std::to_string(frame::kProtocolVersion) + " (install matching kernel-bridge versions)";
    }
    if (p[kOffRole] != static_cast<std::uint8_t>(expected_role) || p[kOffReserved] != 0) {
      return std::string("peer does not present itself as the ") + role_name(expected_role) +
             " (both ends configured as the same role?)";
    }
    const auto window = frame::get_u32(p + kOffWindow);
    if (window < kMinWindow || window > kMaxWindow) {
      return "peer advertises an invalid stream window of " + std::to_string(window) + " bytes";
    }
    result_.peer_window = window;
    std::memcpy(result_.peer_session.data(), p + kOffSession, frame::kSessionIdSize);
    std::memcpy(result_.peer_knows_me.data(), p + kOffKnown, frame::kSessionIdSize);
    return {};
  };

  if (role_ == Role::agent) {
    if (step_ == Step::initial) {
      if (h.type != FrameType::hello) {
        return fail(std::string("expected HELLO, got ") + frame::to_string(h.type));
      }
      if (auto err = check_hello(Role::bridge); !err.empty()) return fail(std::move(err));
      std::memcpy(transcript_.data(), f.payload.data(), frame::kHelloSize);
      encode_hello(transcript_.data() + frame::kHelloSize, Role::agent);
      const auto my_proof = proof(Role::agent);
      std::array<std::uint8_t, frame::kChallengeSize> payload{};
      std::memcpy(payload.data(), transcript_.data() + frame::kHelloSize, frame::kHelloSize);
      std::memcpy(payload.data() + frame::kHelloSize, my_proof.data(), my_proof.size());
      frame::append_frame(out, FrameType::challenge, 0, 0, payload);
      step_ = Step::sent_challenge;
      return status_;
    }
    if (step_ == Step::sent_challenge) {
      if (h.type != FrameType::response) {
        return fail(std::string("expected RESPONSE, got ") + frame::to_string(h.type));
      }
      const auto expected = proof(Role::bridge);
      if (!kb::auth::equal_constant_time(expected, f.payload)) {
        return fail(
            "authentication failed: the bridge's proof does not match this kernel's link "
            "secret (wrong or stale secret file?)");
      }
      step_ = Step::done;
      status_ = Status::authenticated;
      return status_;
    }
    return fail("unexpected frame during the handshake");
  }

  // Bridge.
  if (step_ == Step::sent_hello) {
    if (h.type != FrameType::challenge) {
      return fail(std::string("expected CHALLENGE, got ") + frame::to_string(h.type));
    }
    if (auto err = check_hello(Role::agent); !err.empty()) return fail(std::move(err));
    std::memcpy(transcript_.data() + frame::kHelloSize, f.payload.data(), frame::kHelloSize);
    const auto expected = proof(Role::agent);
    if (!kb::auth::equal_constant_time(expected,
                                       f.payload.subspan(frame::kHelloSize, frame::kProofSize))) {
      return fail(
          "authentication failed: the agent's proof does not match this kernel's link "
          "secret (wrong agent, or the agent has another secret)");
    }
    const auto my_proof = proof(Role::bridge);
    frame::append_frame(out, FrameType::response, 0, 0, my_proof);
    step_ = Step::done;
    status_ = Status::authenticated;
    return status_;
  }
  return fail(std::string("unexpected ") + frame::to_string(h.type) +
              " frame during the handshake");
}

}  // namespace kb::tunnel
