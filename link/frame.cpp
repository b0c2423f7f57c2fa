#include "link/frame.hpp"

#include <algorithm>
#include <cstring>

namespace kb::tunnel::frame {

const char* to_string(FrameType type) {
  switch (type) {
    case FrameType::hello:
      return "HELLO";
    case FrameType::challenge:
      return "CHALLENGE";
    case FrameType::response:
      return "RESPONSE";
    case FrameType::resume:
      return "RESUME";
    case FrameType::ack:
      return "ACK";
    case FrameType::ping:
      return "PING";
    case FrameType::pong:
      return "PONG";
    case FrameType::goodbye:
      return "GOODBYE";
    case FrameType::open:
      return "OPEN";
    case FrameType::data:
      return "DATA";
    case FrameType::credit:
      return "CREDIT";
    case FrameType::fin:
      return "FIN";
    case FrameType::reset:
      return "RESET";
    case FrameType::control:
      return "CONTROL";
  }
  return "UNKNOWN";
}

bool is_sequenced(FrameType type) {
  return static_cast<std::uint8_t>(type) >= static_cast<std::uint8_t>(FrameType::open);
}

bool is_handshake(FrameType type) {
  return type == FrameType::hello || type == FrameType::challenge || type == FrameType::response ||
         type == FrameType::resume;
}

void put_u16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}
void put_u32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<std::uint8_t>(v);
}
void put_u64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<std::uint8_t>(v);
}
std::uint16_t get_u16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
}
std::uint32_t get_u32(const std::uint8_t* p) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | p[i];
  return v;
}
std::uint64_t get_u64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}
std::array<std::uint8_t, 8> u64_bytes(std::uint64_t v) {
  std::array<std::uint8_t, 8> out{};
  put_u64(out.data(), v);
  return out;
}

void encode_header(const FrameHeader& h, std::uint8_t* out) {
  out[0] = static_cast<std::uint8_t>(h.type);
  out[1] = h.flags;
  put_u16(out + 2, h.reserved);
  put_u32(out + 4, h.stream_id);
  put_u32(out + 8, h.length);
  put_u64(out + 12, h.seq);
}

FrameHeader parse_header(const std::uint8_t* in) {
  FrameHeader h;
  h.type = static_cast<FrameType>(in[0]);
  h.flags = in[1];
  h.reserved = get_u16(in + 2);
  h.stream_id = get_u32(in + 4);
  h.length = get_u32(in + 8);
  h.seq = get_u64(in + 12);
  return h;
}

namespace {

bool known_type(std::uint8_t t) {
  return (t >= 1 && t <= 8) || (t >= 16 && t <= 21);
}

std::string length_error(const FrameHeader& h, const char* expected) {
  return std::string(to_string(h.type)) + " frame with a payload of " + std::to_string(h.length) +
         " bytes (expected " + expected + ")";
}

}  // namespace

std::string validate_header(const FrameHeader& h) {
  const auto raw = static_cast<std::uint8_t>(h.type);
  if (!known_type(raw)) return "unknown frame type " + std::to_string(raw);
  if (h.flags != 0) return std::string(to_string(h.type)) + " frame with unknown flags";
  if (h.reserved != 0) return std::string(to_string(h.type)) + " frame with non-zero reserved bits";
  if (h.length > kMaxPayload) {
    return std::string(to_string(h.type)) + " frame of " + std::to_string(h.length) +
           " bytes exceeds the maximum frame payload (" + std::to_string(kMaxPayload) + ")";
  }
  if (is_sequenced(h.type)) {
    if (h.seq == 0) return std::string(to_string(h.type)) + " frame without a sequence number";
  } else if (h.seq != 0) {
    return std::string(to_string(h.type)) + " frame must not carry a sequence number";
  }
  const bool needs_stream = h.type == FrameType::open || h.type == FrameType::data ||
                            h.type == FrameType::credit || h.type == FrameType::fin ||
                            h.type == FrameType::reset;
  if (needs_stream && h.stream_id == 0) {
    return std::string(to_string(h.type)) + " frame for stream 0";
  }
  if (!needs_stream && h.stream_id != 0) {
    return std::string(to_string(h.type)) + " frame must use stream 0";
  }
  switch (h.type) {
    case FrameType::hello:
      if (h.length != kHelloSize) return length_error(h, "72");
      break;
    case FrameType::challenge:
      if (h.length != kChallengeSize) return length_error(h, "104");
      break;
    case FrameType::response:
      if (h.length != kProofSize) return length_error(h, "32");
      break;
    case FrameType::resume:
    case FrameType::ack:
    case FrameType::ping:
    case FrameType::pong:
      if (h.length != 8) return length_error(h, "8");
      break;
    case FrameType::goodbye:
    case FrameType::reset:
      if (h.length > kMaxReasonLength) return length_error(h, "at most 1024");
      break;
    case FrameType::open:
      if (h.length != 1) return length_error(h, "1");
      break;
    case FrameType::data:
      if (h.length == 0 || h.length > kMaxDataPayload) return length_error(h, "1 to 65536");
      break;
    case FrameType::credit:
      if (h.length != 4) return length_error(h, "4");
      break;
    case FrameType::fin:
      if (h.length != 0) return length_error(h, "0");
      break;
    case FrameType::control:
      if (h.length == 0) return length_error(h, "1 to 262144");
      break;
  }
  return {};
}

std::string validate_payload(const FrameHeader& h, std::span<const std::uint8_t> payload) {
  if (payload.size() != h.length) return "frame payload length mismatch";
  switch (h.type) {
    case FrameType::open:
      if (payload[0] > 4)
        return "OPEN frame with unknown channel kind " + std::to_string(payload[0]);
      break;
    case FrameType::credit:
      if (get_u32(payload.data()) == 0) return "CREDIT frame granting 0 bytes";
      break;
    default:
      break;
  }
  return {};
}

void append_frame(std::vector<std::uint8_t>& out, FrameType type, std::uint32_t stream_id,
                  std::uint64_t seq, std::span<const std::uint8_t> payload) {
  const std::size_t at = out.size();
  out.resize(at + kHeaderSize + payload.size());
  FrameHeader h;
  h.type = type;
  h.stream_id = stream_id;
  h.length = static_cast<std::uint32_t>(payload.size());
  h.seq = seq;
  encode_header(h, out.data() + at);
  if (!payload.empty()) std::memcpy(out.data() + at + kHeaderSize, payload.data(), payload.size());
}

FrameDecoder::FrameDecoder() : buffer_(kMinReadSize + kHeaderSize) {}

std::span<std::uint8_t> FrameDecoder::prepare() {
  if (begin_ == end_) {
    begin_ = end_ = 0;
    if (buffer_.size() > 2 * (read_size_ + kHeaderSize)) {
      // Idle again after a burst or a large frame: give the memory back.
      buffer_.resize(read_size_ + kHeaderSize);
      buffer_.shrink_to_fit();
    }
  }
  if (buffer_.size() - end_ < read_size_) {
    // Move the unparsed tail to the front, then grow only if one frame plus a read still does not
    // fit (bounded by kMaxPayload + kHeaderSize + kReadSize).
    if (begin_ > 0) {
      std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    if (buffer_.size() - end_ < read_size_) buffer_.resize(end_ + read_size_);
  }
  prepared_ = buffer_.size() - end_;
  return {buffer_.data() + end_, prepared_};
}

void FrameDecoder::commit(std::size_t n) {
  end_ += n;
  if (n == prepared_) {
    read_size_ = kReadSize;  // more is waiting: bulk traffic gets large reads at once
    small_reads_ = 0;
  } else if (n < read_size_ / 4) {
    // Hysteresis: a handshake or a few acks in the middle of bulk traffic do not shrink it.
    if (++small_reads_ >= 4) {
      read_size_ = kMinReadSize;
      small_reads_ = 0;
    }
  } else {
    small_reads_ = 0;
  }
}

FrameDecoder::Status FrameDecoder::next(DecodedFrame& out, std::string& error_text) {
  if (failed_) {
    error_text = failure_;
    return Status::error;
  }
  if (end_ - begin_ < kHeaderSize) return Status::need_more;
  const FrameHeader h = parse_header(buffer_.data() + begin_);
  if (auto err = validate_header(h); !err.empty()) {
    failed_ = true;
    failure_ = std::move(err);
    error_text = failure_;
    return Status::error;
  }
  if (end_ - begin_ < kHeaderSize + h.length) return Status::need_more;
  out.header = h;
  out.payload = {buffer_.data() + begin_ + kHeaderSize, h.length};
  if (auto err = validate_payload(h, out.payload); !err.empty()) {
    failed_ = true;
    failure_ = std::move(err);
    error_text = failure_;
    return Status::error;
  }
  begin_ += kHeaderSize + h.length;
  return Status::frame;
}

}  // namespace kb::tunnel::frame
