#pragma once
// The link's wire format: a fixed 20-byte header (big-endian) followed by the payload, and an
// incremental decoder that validates every frame strictly. Layout and rules: docs/protocol.md.
// Pure data code without I/O; callable from any thread (a decoder is used by one thread at a time).
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kb::tunnel::frame {

inline constexpr std::size_t kHeaderSize = 20;
inline constexpr std::uint16_t kProtocolVersion = 1;
inline constexpr std::size_t kMaxDataPayload = 64 * 1024;
inline constexpr std::size_t kMaxControlPayload = 256 * 1024;
inline constexpr std::size_t kMaxReasonLength = 1024;  // RESET and GOODBYE texts
inline constexpr std::size_t kMaxPayload = kMaxControlPayload;
inline constexpr std::size_t kSessionIdSize = 16;
inline constexpr std::size_t kNonceSize = 32;
inline constexpr std::size_t kProofSize = 32;
inline constexpr std::size_t kHelloSize = 2 + 1 + 1 + 4 + kSessionIdSize * 2 + kNonceSize;  // 72
inline constexpr std::size_t kChallengeSize = kHelloSize + kProofSize;                      // 104

enum class FrameType : std::uint8_t {
  // Link-level frames: stream 0, seq 0, never retransmitted.
  hello = 1,
  challenge = 2,
  response = 3,
  resume = 4,
  ack = 5,
  ping = 6,
  pong = 7,
  goodbye = 8,
  // Sequenced frames: seq = previous + 1, kept for replay until acknowledged.
  open = 16,
  data = 17,
  credit = 18,
  fin = 19,
  reset = 20,
  control = 21,
};
const char* to_string(FrameType type);
// True for the frame types that carry a sequence number and are retransmitted after a resume.
bool is_sequenced(FrameType type);
bool is_handshake(FrameType type);

struct FrameHeader {
  FrameType type{};
  std::uint8_t flags = 0;      // no flags defined in version 1; must be 0
  std::uint16_t reserved = 0;  // must be 0
  std::uint32_t stream_id = 0;
  std::uint32_t length = 0;  // payload bytes following the header
  std::uint64_t seq = 0;
};

// Writes the 20 header bytes to `out`.
void encode_header(const FrameHeader& header, std::uint8_t* out);
// Parses 20 header bytes (no validation).
FrameHeader parse_header(const std::uint8_t* in);
// Structural validation of a header: known type, zero flags/reserved, stream id and seq rules, and
// the payload length allowed for the type. Returns an empty string if valid, else the reason.
std::string validate_header(const FrameHeader& header);
// Payload validation that needs the bytes (e.g. the channel kind of OPEN, a non-zero credit).
std::string validate_payload(const FrameHeader& header, std::span<const std::uint8_t> payload);

// Appends a whole frame (header + payload) to `out`.
void append_frame(std::vector<std::uint8_t>& out, FrameType type, std::uint32_t stream_id,
                  std::uint64_t seq, std::span<const std::uint8_t> payload);

// Big-endian helpers.
void put_u16(std::uint8_t* p, std::uint16_t v);
void put_u32(std::uint8_t* p, std::uint32_t v);
void put_u64(std::uint8_t* p, std::uint64_t v);
std::uint16_t get_u16(const std::uint8_t* p);
std::uint32_t get_u32(const std::uint8_t* p);
std::uint64_t get_u64(const std::uint8_t* p);
std::array<std::uint8_t, 8> u64_bytes(std::uint64_t v);

struct DecodedFrame {
  FrameHeader header;
  std::span<const std::uint8_t> payload;  // valid until the decoder's next prepare()/next()
};

// Incremental decoder: read transport bytes into prepare(), commit() them, then call next() until
// it stops returning `frame`. Memory is bounded by one maximal frame plus one read.
class FrameDecoder {
 public:
  enum class Status { frame, need_more, error };
  static constexpr std::size_t kReadSize = 64 * 1024;  // largest read
  static constexpr std::size_t kMinReadSize = 4 * 1024;

  FrameDecoder();
  // A writable region for the next read. Its size adapts: it starts at kMinReadSize, a read that
  // fills it raises it to kReadSize, a run of four small reads drops it back, and an empty decoder
  // gives surplus memory back — an idle link holds a few KiB, a busy one reads 64 KiB at a time.
  std::span<std::uint8_t> prepare();
  void commit(std::size_t n);
  // On `error`, `error_text` says why and the decoder stays in the error state.
  Status next(DecodedFrame& out, std::string& error_text);
  std::size_t buffered() const { return end_ - begin_; }
  std::size_t memory() const { return buffer_.capacity(); }  // bytes held, for tests and metrics

 private:
  std::vector<std::uint8_t> buffer_;
  std::size_t begin_ = 0, end_ = 0;
  std::size_t read_size_ = kMinReadSize;
  std::size_t prepared_ = 0;
  int small_reads_ = 0;
  bool failed_ = false;
  std::string failure_;
};

}  // namespace kb::tunnel::frame
