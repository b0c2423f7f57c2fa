// libFuzzer target: a live agent-side LinkSession (link/session.*) fed with arbitrary bytes
// after a correct handshake, i.e. what an authenticated but buggy or hostile bridge could send:
// sequenced frames in any order, unknown streams, credit overflows, acks out of range, truncated
// frames. Invariants: no crash, no sanitizer report, memory bounded (replay buffer within limits).
#include <spdlog/spdlog.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "link/handshake.hpp"
#include "link/session.hpp"
#include "tests/link/test_transports.hpp"

using namespace kb::tunnel;
namespace asio = boost::asio;

namespace {

void run_ready(asio::io_context& io) {
  io.restart();
  for (int i = 0; i < 10000 && io.poll() > 0; ++i) io.restart();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static bool once = [] {
    spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)once;
  asio::io_context io;
  const auto secret = kb::auth::LinkSecret{std::vector<std::uint8_t>(32, 0x42)};
  LinkSession::Options opts;
  opts.stream_window = 16 * 1024;
  opts.replay_limit = 64 * 1024;
  opts.max_chunk = 4096;
  opts.max_streams = 8;
  std::shared_ptr<LinkSession> agent;
  LinkSession::Handlers h;
  h.on_stream_request = [&](std::uint32_t id, ChannelKind) {
    if (id % 2 == 0) agent->refuse_stream(id, "even ids refused");  // odd ids stay pending
  };
  h.on_control = [](const nlohmann::json&) {};
  agent = LinkSession::create(io, LinkSession::Role::agent, secret, opts, h);

  auto ends = testing::make_pipe(io, nullptr, 1 << 20, "fuzz");
  ByteTransportPtr mine = std::move(ends.first);
  agent->attach_transport(std::move(ends.second));
  SessionId self{};
  self.fill(7);
  LinkHandshake hs(LinkHandshake::Role::bridge, secret.bytes, self, SessionId{}, 1 << 20,
                   std::vector<std::uint8_t>(frame::kNonceSize, 3));
  std::vector<std::uint8_t> out;
  hs.start(out);
  mine->async_write(asio::buffer(out), [](boost::system::error_code, std::size_t) {});
  frame::FrameDecoder dec;
  std::vector<std::uint8_t> reply;
  bool reading = true;
  std::function<void()> read = [&] {
    auto b = dec.prepare();
    mine->async_read_some(
        asio::buffer(b.data(), b.size()), [&](boost::system::error_code ec, std::size_t n) {
          if (ec) {
            reading = false;
            return;
          }
          dec.commit(n);
          frame::DecodedFrame f;
          std::string err;
          while (dec.next(f, err) == frame::FrameDecoder::Status::frame) {
            if (hs.status() == LinkHandshake::Status::in_progress) {
              if (hs.on_frame(f, reply) == LinkHandshake::Status::authenticated) {
                frame::append_frame(reply, frame::FrameType::resume, 0, 0, frame::u64_bytes(0));
              }
            }
          }
          read();
        });
  };
  read();
  run_ready(io);
  if (hs.status() != LinkHandshake::Status::authenticated) std::abort();
  mine->async_write(asio::buffer(reply), [](boost::system::error_code, std::size_t) {});
  run_ready(io);
  if (agent->state() != LinkState::up) std::abort();

  std::vector<std::uint8_t> input(data, data + size);
  mine->async_write(asio::buffer(input), [](boost::system::error_code, std::size_t) {});
  run_ready(io);
  const auto st = agent->stats();
  if (st.replay_bytes > opts.replay_limit + 64 * 1024) std::abort();
  if (st.streams > opts.max_streams) std::abort();
  agent.reset();
  mine->close();
  run_ready(io);
  return 0;
}
