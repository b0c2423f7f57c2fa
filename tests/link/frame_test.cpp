// Tests link/frame.*: the link's wire format and the strict decoder.
#include "link/frame.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>

namespace kb::tunnel::frame {
namespace {

using Bytes = std::vector<std::uint8_t>;
Bytes bytes_of(const std::string& s) {
  return {s.begin(), s.end()};
}
Bytes v64(std::uint64_t v) {
  auto a = u64_bytes(v);
  return {a.begin(), a.end()};
}

// Feeds `wire` to a fresh decoder in pieces of `step` bytes; returns the frames decoded, or the
// error text in `error`.
std::vector<std::pair<FrameHeader, std::vector<std::uint8_t>>> decode_all(
    const std::vector<std::uint8_t>& wire, std::size_t step, std::string* error = nullptr) {
  FrameDecoder d;
  std::vector<std::pair<FrameHeader, std::vector<std::uint8_t>>> out;
  std::size_t pos = 0;
  while (pos < wire.size()) {
    auto buf = d.prepare();
    const std::size_t n = std::min({step, buf.size(), wire.size() - pos});
    std::memcpy(buf.data(), wire.data() + pos, n);
    d.commit(n);
    pos += n;
    DecodedFrame f;
    std::string err;
    for (;;) {
      auto st = d.next(f, err);
      if (st == FrameDecoder::Status::need_more) break;
      if (st == FrameDecoder::Status::error) {
        if (error) *error = err;
        return out;
      }
      out.emplace_back(f.header, std::vector<std::uint8_t>(f.payload.begin(), f.payload.end()));
    }
  }
  return out;
}

std::string reject(FrameType type, std::uint32_t stream, std::uint64_t seq,
                   const std::vector<std::uint8_t>& payload) {
  std::vector<std::uint8_t> wire;
  append_frame(wire, type, stream, seq, payload);
  std::string err;
  auto frames = decode_all(wire, wire.size(), &err);
  EXPECT_TRUE(frames.empty()) << "frame was accepted: " << to_string(type);
  return err;
}

TEST(Frame, HeaderLayoutIsBigEndianAndFixed) {
  FrameHeader h;
  h.type = FrameType::data;
  h.stream_id = 0x01020304;
  h.length = 0x00000005;
  h.seq = 0x1122334455667788ULL;
  std::uint8_t out[kHeaderSize];
  encode_header(h, out);
  const std::uint8_t expected[kHeaderSize] = {
      17, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 5, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88};
  EXPECT_EQ(0, std::memcmp(out, expected, kHeaderSize));
  const auto back = parse_header(out);
  EXPECT_EQ(back.type, h.type);
  EXPECT_EQ(back.stream_id, h.stream_id);
  EXPECT_EQ(back.length, h.length);
  EXPECT_EQ(back.seq, h.seq);
}

TEST(Frame, RoundTripOfEveryValidKindSurvivesAnySplit) {
  std::vector<std::uint8_t> wire;
  std::mt19937 rng(7);
  std::vector<std::uint8_t> big(kMaxDataPayload);
  for (auto& b : big) b = static_cast<std::uint8_t>(rng());
  std::vector<std::uint8_t> control(kMaxControlPayload, '{');
  append_frame(wire, FrameType::hello, 0, 0, std::vector<std::uint8_t>(kHelloSize, 1));
  append_frame(wire, FrameType::challenge, 0, 0, std::vector<std::uint8_t>(kChallengeSize, 2));
  append_frame(wire, FrameType::response, 0, 0, std::vector<std::uint8_t>(kProofSize, 3));
  append_frame(wire, FrameType::resume, 0, 0, v64(42));
  append_frame(wire, FrameType::ack, 0, 0, v64(7));
  append_frame(wire, FrameType::ping, 0, 0, v64(1));
  append_frame(wire, FrameType::pong, 0, 0, v64(1));
  append_frame(wire, FrameType::open, 3, 1, Bytes{4});
  append_frame(wire, FrameType::data, 3, 2, big);
  append_frame(wire, FrameType::data, 3, 3, Bytes{9});
  append_frame(wire, FrameType::credit, 3, 4, Bytes{0, 0, 1, 0});
  append_frame(wire, FrameType::fin, 3, 5, Bytes{});
  append_frame(wire, FrameType::reset, 3, 6, bytes_of("gone"));
  append_frame(wire, FrameType::control, 0, 7, control);
  append_frame(wire, FrameType::goodbye, 0, 0, Bytes{});
  for (std::size_t step : {std::size_t{1}, std::size_t{7}, std::size_t{4096}, wire.size()}) {
    std::string err;
    auto frames = decode_all(wire, step, &err);
    ASSERT_TRUE(err.empty()) << err;
    ASSERT_EQ(frames.size(), 15u) << "step " << step;
    EXPECT_EQ(frames[8].first.type, FrameType::data);
    EXPECT_EQ(frames[8].second, big);
    EXPECT_EQ(frames[13].second, control);
    EXPECT_EQ(frames[7].first.stream_id, 3u);
    EXPECT_EQ(frames[12].first.seq, 6u);
    EXPECT_EQ(get_u64(frames[3].second.data()), 42u);
  }
}

TEST(Frame, RejectsUnknownTypesFlagsAndReservedBits) {
  std::vector<std::uint8_t> wire(kHeaderSize, 0);
  wire[0] = 99;
  std::string err;
  EXPECT_TRUE(decode_all(wire, wire.size(), &err).empty());
  EXPECT_NE(err.find("unknown frame type 99"), std::string::npos) << err;

  for (int byte : {1, 2, 3}) {
    std::vector<std::uint8_t> w;
    append_frame(w, FrameType::ack, 0, 0, v64(1));
    w[byte] = 1;
    err.clear();
    EXPECT_TRUE(decode_all(w, w.size(), &err).empty());
    EXPECT_FALSE(err.empty()) << "byte " << byte;
  }
}

TEST(Frame, RejectsOversizedFramesFromTheHeaderAlone) {
  // Only the header arrives: the decoder must refuse without waiting for (or buffering) 4 GiB.
  FrameHeader h;
  h.type = FrameType::control;
  h.length = 0xffffffffu;
  h.seq = 1;
  std::vector<std::uint8_t> wire(kHeaderSize);
  encode_header(h, wire.data());
  std::string err;
  EXPECT_TRUE(decode_all(wire, wire.size(), &err).empty());
  EXPECT_NE(err.find("exceeds the maximum frame payload"), std::string::npos) << err;

  EXPECT_NE(
      reject(FrameType::data, 1, 1, std::vector<std::uint8_t>(kMaxDataPayload + 1)).find("DATA"),
      std::string::npos);
}

TEST(Frame, RejectsSequenceAndStreamRuleViolations) {
  EXPECT_NE(reject(FrameType::data, 1, 0, {1}).find("without a sequence number"),
            std::string::npos);
  EXPECT_NE(reject(FrameType::ack, 0, 5, v64(1)).find("must not carry a sequence number"),
            std::string::npos);
  EXPECT_NE(reject(FrameType::data, 0, 1, {1}).find("stream 0"), std::string::npos);
  EXPECT_NE(reject(FrameType::control, 4, 1, {'{'}).find("must use stream 0"), std::string::npos);
  EXPECT_NE(reject(FrameType::ping, 2, 0, v64(1)).find("must use stream 0"), std::string::npos);
}

TEST(Frame, RejectsWrongPayloadSizesPerType) {
  EXPECT_FALSE(reject(FrameType::hello, 0, 0, std::vector<std::uint8_t>(71)).empty());
  EXPECT_FALSE(reject(FrameType::challenge, 0, 0, std::vector<std::uint8_t>(72)).empty());
  EXPECT_FALSE(reject(FrameType::response, 0, 0, std::vector<std::uint8_t>(31)).empty());
  EXPECT_FALSE(reject(FrameType::resume, 0, 0, std::vector<std::uint8_t>(4)).empty());
  EXPECT_FALSE(reject(FrameType::ack, 0, 0, {}).empty());
  EXPECT_FALSE(reject(FrameType::open, 1, 1, {}).empty());
  EXPECT_FALSE(reject(FrameType::data, 1, 1, {}).empty());
  EXPECT_FALSE(reject(FrameType::credit, 1, 1, {0, 1}).empty());
  EXPECT_FALSE(reject(FrameType::fin, 1, 1, {0}).empty());
  EXPECT_FALSE(
      reject(FrameType::reset, 1, 1, std::vector<std::uint8_t>(kMaxReasonLength + 1)).empty());
  EXPECT_FALSE(
      reject(FrameType::goodbye, 0, 0, std::vector<std::uint8_t>(kMaxReasonLength + 1)).empty());
  EXPECT_FALSE(reject(FrameType::control, 0, 1, {}).empty());
}

TEST(Frame, RejectsBadPayloadValues) {
  EXPECT_NE(reject(FrameType::open, 1, 1, {5}).find("unknown channel kind"), std::string::npos);
  EXPECT_NE(reject(FrameType::credit, 1, 1, {0, 0, 0, 0}).find("granting 0"), std::string::npos);
}

TEST(Frame, ErrorIsStickyAndNothingAfterItIsDecoded) {
  std::vector<std::uint8_t> wire;
  append_frame(wire, FrameType::ack, 0, 0, v64(1));
  wire.push_back(200);  // garbage header start
  wire.resize(wire.size() + kHeaderSize, 0);
  append_frame(wire, FrameType::ack, 0, 0, v64(2));
  std::string err;
  auto frames = decode_all(wire, 3, &err);
  ASSERT_EQ(frames.size(), 1u);
  EXPECT_FALSE(err.empty());
}

TEST(Frame, DecoderMemoryStaysBoundedUnderAStreamOfMaximalFrames) {
  FrameDecoder d;
  std::vector<std::uint8_t> one;
  append_frame(one, FrameType::control, 0, 1, std::vector<std::uint8_t>(kMaxControlPayload, 'x'));
  std::size_t max_buffered = 0;
  std::size_t frames = 0;
  for (int round = 0; round < 20; ++round) {
    std::size_t pos = 0;
    while (pos < one.size()) {
      auto buf = d.prepare();
      const std::size_t n = std::min(buf.size(), one.size() - pos);
      std::memcpy(buf.data(), one.data() + pos, n);
      d.commit(n);
      pos += n;
      max_buffered = std::max(max_buffered, d.buffered());
      DecodedFrame f;
      std::string err;
      while (d.next(f, err) == FrameDecoder::Status::frame) ++frames;
    }
  }
  EXPECT_EQ(frames, 20u);
  EXPECT_LE(max_buffered, kHeaderSize + kMaxPayload + FrameDecoder::kReadSize);
}

TEST(Frame, DecoderGivesMemoryBackWhenTheLinkIsIdleAgain) {
  FrameDecoder d;
  std::vector<std::uint8_t> wire;
  append_frame(wire, FrameType::control, 0, 1, std::vector<std::uint8_t>(kMaxControlPayload, 'x'));
  std::size_t pos = 0;
  std::size_t frames = 0;
  DecodedFrame f;
  std::string err;
  while (pos < wire.size()) {  // a busy link: every read is filled
    auto buf = d.prepare();
    const std::size_t n = std::min(buf.size(), wire.size() - pos);
    std::memcpy(buf.data(), wire.data() + pos, n);
    d.commit(n);
    pos += n;
    while (d.next(f, err) == FrameDecoder::Status::frame) ++frames;
  }
  ASSERT_EQ(frames, 1u);
  EXPECT_GE(d.memory(), kMaxControlPayload);
  for (int i = 0; i < 40; ++i) {  // then only small frames (pings, acks)
    std::vector<std::uint8_t> ping;
    append_frame(ping, FrameType::ping, 0, 0, v64(i));
    auto buf = d.prepare();
    std::memcpy(buf.data(), ping.data(), ping.size());
    d.commit(ping.size());
    ASSERT_EQ(d.next(f, err), FrameDecoder::Status::frame);
  }
  d.prepare();
  EXPECT_LE(d.memory(), 2 * (FrameDecoder::kMinReadSize + kHeaderSize));
}

}  // namespace
}  // namespace kb::tunnel::frame
