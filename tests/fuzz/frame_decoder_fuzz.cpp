// libFuzzer target: the link's frame decoder (link/frame.*). The input is cut into reads of
// varying size (driven by the input itself) so frames split across reads are exercised. Invariants:
// no crash, every decoded frame passes validation and fits the limits, memory stays bounded.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "link/frame.hpp"

using namespace kb::tunnel::frame;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t step = 1 + data[0] % 97;  // read size pattern
  data += 1;
  size -= 1;
  FrameDecoder decoder;
  std::size_t pos = 0;
  while (pos < size) {
    auto buf = decoder.prepare();
    const std::size_t n = std::min({step, buf.size(), size - pos});
    std::memcpy(buf.data(), data + pos, n);
    decoder.commit(n);
    pos += n;
    DecodedFrame f;
    std::string err;
    for (;;) {
      const auto st = decoder.next(f, err);
      if (st == FrameDecoder::Status::need_more) break;
      if (st == FrameDecoder::Status::error) {
        if (err.empty()) std::abort();  // every rejection must say why
        return 0;
      }
      if (f.payload.size() != f.header.length || f.header.length > kMaxPayload) std::abort();
      if (!validate_header(f.header).empty()) std::abort();
      if (!validate_payload(f.header, f.payload).empty()) std::abort();
      // Re-encoding a decoded frame gives the same bytes.
      std::vector<std::uint8_t> again;
      append_frame(again, f.header.type, f.header.stream_id, f.header.seq, f.payload);
      if (again.size() != kHeaderSize + f.payload.size()) std::abort();
    }
    if (decoder.buffered() > kHeaderSize + kMaxPayload + FrameDecoder::kReadSize) std::abort();
  }
  return 0;
}
