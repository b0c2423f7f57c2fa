// libFuzzer target: the handshake state machine (link/handshake.*) in both roles, fed with
// whatever frames the input decodes to. Invariants: no crash; without the secret the input can
// never authenticate either role (the proofs are HMACs over fresh nonces).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "link/handshake.hpp"

using namespace kb::tunnel;

namespace {

void drive(LinkHandshake::Role role, const std::uint8_t* data, std::size_t size) {
  const std::vector<std::uint8_t> secret(32, 0x42);  // the input does not know it
  SessionId self{};
  self.fill(1);
  const std::vector<std::uint8_t> nonce(frame::kNonceSize, 0x17);
  LinkHandshake hs(role, secret, self, SessionId{}, 65536, nonce);
  std::vector<std::uint8_t> out;
  hs.start(out);
  frame::FrameDecoder decoder;
  auto buf = decoder.prepare();
  const std::size_t n = std::min(buf.size(), size);
  std::memcpy(buf.data(), data, n);
  decoder.commit(n);
  frame::DecodedFrame f;
  std::string err;
  while (decoder.next(f, err) == frame::FrameDecoder::Status::frame) {
    const auto st = hs.on_frame(f, out);
    if (st == LinkHandshake::Status::authenticated) std::abort();  // forged without the secret
    if (st == LinkHandshake::Status::failed) {
      if (hs.error().empty()) std::abort();
      // Failed is final.
      if (hs.on_frame(f, out) != LinkHandshake::Status::failed) std::abort();
      break;
    }
  }
  if (out.size() > 4 * (frame::kHeaderSize + frame::kChallengeSize)) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  drive(LinkHandshake::Role::agent, data, size);
  drive(LinkHandshake::Role::bridge, data, size);
  return 0;
}
