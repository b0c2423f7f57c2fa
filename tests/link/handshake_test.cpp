// Tests link/handshake.*: mutual challenge-response as a pure state machine.
#include "link/handshake.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "auth/secret.hpp"

namespace kb::tunnel {
namespace {

using frame::DecodedFrame;
using frame::FrameDecoder;
using Role = LinkHandshake::Role;
using Status = LinkHandshake::Status;

SessionId sid(std::uint8_t v) {
  SessionId s{};
  s.fill(v);
  return s;
}

std::vector<std::uint8_t> nonce(std::uint8_t v) {
  return std::vector<std::uint8_t>(frame::kNonceSize, v);
}

// Decodes exactly one frame from `wire` (the handshake emits whole frames).
struct OneFrame {
  explicit OneFrame(const std::vector<std::uint8_t>& wire) {
    auto buf = dec.prepare();
    std::memcpy(buf.data(), wire.data(), wire.size());
    dec.commit(wire.size());
    std::string err;
    ok = dec.next(f, err) == FrameDecoder::Status::frame;
  }
  FrameDecoder dec;
  DecodedFrame f;
  bool ok = false;
};

struct Pair {
  Pair(const auth::Bytes& bridge_secret, const auth::Bytes& agent_secret)
      : bridge(Role::bridge, bridge_secret, sid(1), SessionId{}, 65536, nonce(0xb1)),
        agent(Role::agent, agent_secret, sid(2), SessionId{}, 131072, nonce(0xa1)) {}
  LinkHandshake bridge, agent;
};

TEST(LinkHandshake, MatchingSecretsAuthenticateBothSides) {
  const auto secret = auth::LinkSecret::generate().bytes;
  Pair p(secret, secret);
  std::vector<std::uint8_t> hello, challenge, response;
  p.bridge.start(hello);
  ASSERT_EQ(hello.size(), frame::kHeaderSize + frame::kHelloSize);
  OneFrame h(hello);
  ASSERT_TRUE(h.ok);
  EXPECT_EQ(p.agent.on_frame(h.f, challenge), Status::in_progress);
  OneFrame c(challenge);
  ASSERT_TRUE(c.ok);
  EXPECT_EQ(p.bridge.on_frame(c.f, response), Status::authenticated);
  OneFrame r(response);
  ASSERT_TRUE(r.ok);
  std::vector<std::uint8_t> none;
  EXPECT_EQ(p.agent.on_frame(r.f, none), Status::authenticated);
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(p.bridge.result().peer_session, sid(2));
  EXPECT_EQ(p.bridge.result().peer_window, 131072u);
  EXPECT_EQ(p.agent.result().peer_session, sid(1));
  EXPECT_EQ(p.agent.result().peer_window, 65536u);
}

TEST(LinkHandshake, TheSecretNeverAppearsOnTheWire) {
  const auto secret = auth::LinkSecret::generate().bytes;
  Pair p(secret, secret);
  std::vector<std::uint8_t> wire;
  p.bridge.start(wire);
  OneFrame h(wire);
  p.agent.on_frame(h.f, wire);
  OneFrame c(std::vector<std::uint8_t>(
      wire.begin() + static_cast<long>(frame::kHeaderSize + frame::kHelloSize), wire.end()));
  p.bridge.on_frame(c.f, wire);
  auto it = std::search(wire.begin(), wire.end(), secret.begin(), secret.begin() + 8);
  EXPECT_EQ(it, wire.end());
}

TEST(LinkHandshake, BridgeRefusesAnAgentWithAnotherSecret) {
  Pair p(auth::LinkSecret::generate().bytes, auth::LinkSecret::generate().bytes);
  std::vector<std::uint8_t> hello, challenge, response;
  p.bridge.start(hello);
  OneFrame h(hello);
  p.agent.on_frame(h.f, challenge);
  OneFrame c(challenge);
  EXPECT_EQ(p.bridge.on_frame(c.f, response), Status::failed);
  EXPECT_TRUE(response.empty()) << "the bridge must not answer an unauthenticated agent";
  EXPECT_NE(p.bridge.error().find("authentication failed"), std::string::npos) << p.bridge.error();
}

TEST(LinkHandshake, AgentRefusesABridgeWithAnotherSecret) {
  // The other side computes its proof exactly as a bridge would, but with its own secret.
  const auto agent_secret = auth::LinkSecret::generate().bytes;
  const auto other_secret = auth::LinkSecret::generate().bytes;
  LinkHandshake agent(Role::agent, agent_secret, sid(2), SessionId{}, 65536, nonce(1));
  LinkHandshake other(Role::bridge, other_secret, sid(1), SessionId{}, 65536, nonce(2));
  std::vector<std::uint8_t> hello, challenge;
  other.start(hello);
  OneFrame h(hello);
  agent.on_frame(h.f, challenge);
  OneFrame c(challenge);
  ASSERT_TRUE(c.ok);
  const std::string label = "kernel-bridge link v1: bridge proof";
  std::vector<std::uint8_t> input(label.begin(), label.end());
  input.insert(input.end(), h.f.payload.begin(), h.f.payload.end());
  input.insert(input.end(), c.f.payload.begin(), c.f.payload.begin() + frame::kHelloSize);
  const auto wrong_proof = auth::hmac_sha256(other_secret, input);
  std::vector<std::uint8_t> response;
  frame::append_frame(response, frame::FrameType::response, 0, 0, wrong_proof);
  OneFrame r(response);
  std::vector<std::uint8_t> none;
  EXPECT_EQ(agent.on_frame(r.f, none), Status::failed);
  EXPECT_NE(agent.error().find("authentication failed"), std::string::npos) << agent.error();
  // The same computation with the right secret is accepted: the test checks the real formula.
  LinkHandshake agent2(Role::agent, agent_secret, sid(2), SessionId{}, 65536, nonce(1));
  std::vector<std::uint8_t> challenge2;
  agent2.on_frame(h.f, challenge2);
  EXPECT_EQ(challenge2, challenge);  // same nonces, same transcript
  const auto right_proof = auth::hmac_sha256(agent_secret, input);
  std::vector<std::uint8_t> response2;
  frame::append_frame(response2, frame::FrameType::response, 0, 0, right_proof);
  OneFrame r2(response2);
  EXPECT_EQ(agent2.on_frame(r2.f, none), Status::authenticated);
}

TEST(LinkHandshake, ReflectedAgentProofIsRejected) {
  // An attacker without the secret knocks, receives the agent's proof in CHALLENGE, and sends it
  // back as its RESPONSE (same transcript, same nonces): the role label makes it fail.
  const auto secret = auth::LinkSecret::generate().bytes;
  LinkHandshake agent(Role::agent, secret, sid(2), SessionId{}, 65536, nonce(1));
  LinkHandshake attacker(Role::bridge, auth::LinkSecret::generate().bytes, sid(9), SessionId{},
                         65536, nonce(3));
  std::vector<std::uint8_t> hello, challenge;
  attacker.start(hello);
  OneFrame h(hello);
  agent.on_frame(h.f, challenge);
  OneFrame c(challenge);
  ASSERT_TRUE(c.ok);
  std::vector<std::uint8_t> reflected;
  frame::append_frame(reflected, frame::FrameType::response, 0, 0,
                      c.f.payload.subspan(frame::kHelloSize, frame::kProofSize));
  OneFrame r(reflected);
  std::vector<std::uint8_t> none;
  EXPECT_EQ(agent.on_frame(r.f, none), Status::failed);
}

TEST(LinkHandshake, ReplayedResponseFromAnEarlierHandshakeIsRejected) {
  // A recorded RESPONSE is bound to the nonces of its handshake; a fresh agent nonce voids it.
  const auto secret = auth::LinkSecret::generate().bytes;
  Pair p(secret, secret);
  std::vector<std::uint8_t> hello, challenge, response;
  p.bridge.start(hello);
  OneFrame h(hello);
  p.agent.on_frame(h.f, challenge);
  OneFrame c(challenge);
  p.bridge.on_frame(c.f, response);
  LinkHandshake agent2(Role::agent, secret, sid(2), SessionId{}, 131072, nonce(0xa2));
  std::vector<std::uint8_t> challenge2;
  agent2.on_frame(h.f, challenge2);  // attacker replays the recorded HELLO
  OneFrame r(response);
  std::vector<std::uint8_t> none;
  EXPECT_EQ(agent2.on_frame(r.f, none), Status::failed);
}

TEST(LinkHandshake, RejectsVersionRoleAndOrderViolations) {
  const auto secret = auth::LinkSecret::generate().bytes;
  {
    Pair p(secret, secret);
    std::vector<std::uint8_t> hello, out;
    p.bridge.start(hello);
    hello[frame::kHeaderSize + 1] = 2;  // version 2
    OneFrame h(hello);
    EXPECT_EQ(p.agent.on_frame(h.f, out), Status::failed);
    EXPECT_NE(p.agent.error().find("version 2"), std::string::npos) << p.agent.error();
    EXPECT_TRUE(out.empty());
  }
  {
    // Two agents: the second receives a HELLO that claims the agent role.
    LinkHandshake a1(Role::agent, secret, sid(1), SessionId{}, 65536, nonce(1));
    LinkHandshake b(Role::bridge, secret, sid(3), SessionId{}, 65536, nonce(3));
    std::vector<std::uint8_t> hello, out;
    b.start(hello);
    hello[frame::kHeaderSize + 2] = 1;
    OneFrame h(hello);
    EXPECT_EQ(a1.on_frame(h.f, out), Status::failed);
    EXPECT_NE(a1.error().find("same role"), std::string::npos) << a1.error();
  }
  {
    Pair p(secret, secret);
    std::vector<std::uint8_t> response, out;
    frame::append_frame(response, frame::FrameType::response, 0, 0,
                        std::vector<std::uint8_t>(frame::kProofSize, 1));
    OneFrame r(response);
    EXPECT_EQ(p.agent.on_frame(r.f, out), Status::failed);  // RESPONSE before HELLO
    EXPECT_NE(p.agent.error().find("expected HELLO"), std::string::npos);
  }
  {
    Pair p(secret, secret);
    std::vector<std::uint8_t> hello, out;
    p.bridge.start(hello);
    hello[frame::kHeaderSize + 4] = 0;  // window = 0
    hello[frame::kHeaderSize + 5] = 0;
    hello[frame::kHeaderSize + 6] = 0;
    hello[frame::kHeaderSize + 7] = 0;
    OneFrame h(hello);
    EXPECT_EQ(p.agent.on_frame(h.f, out), Status::failed);
    EXPECT_NE(p.agent.error().find("window"), std::string::npos);
  }
}

TEST(LinkHandshake, GoodbyeDuringHandshakeCarriesThePeersReason) {
  const auto secret = auth::LinkSecret::generate().bytes;
  Pair p(secret, secret);
  std::vector<std::uint8_t> hello, bye, out;
  p.bridge.start(hello);
  const std::string why = "link refused: authentication failed";
  frame::append_frame(bye, frame::FrameType::goodbye, 0, 0,
                      std::vector<std::uint8_t>(why.begin(), why.end()));
  OneFrame g(bye);
  EXPECT_EQ(p.bridge.on_frame(g.f, out), Status::failed);
  EXPECT_NE(p.bridge.error().find(why), std::string::npos);
}

}  // namespace
}  // namespace kb::tunnel
