#pragma once
// Test transports for the link: an in-memory pipe (two ByteTransport ends, bounded buffer, TCP-like
// close semantics) and a seeded "flaky" wrapper that cuts the connection after a byte budget,
// possibly mid-frame, in either direction. Everything completes through io_context::post, on the
// test's single io_context thread.
#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "link/transport.hpp"

namespace kb::tunnel::testing {

namespace asio = boost::asio;
using boost::system::error_code;

class MemoryPipe : public std::enable_shared_from_this<MemoryPipe> {
 public:
  MemoryPipe(asio::io_context& io, std::size_t capacity) : io_(io), capacity_(capacity) {}

  // dir_[i] carries bytes toward end i.
  struct Dir {
    std::vector<std::uint8_t> buf;
    std::size_t off = 0;
    asio::mutable_buffer rbuf;
    ByteTransport::Handler rh;
    asio::const_buffer wbuf;
    std::size_t wdone = 0;
    ByteTransport::Handler wh;
    std::size_t size() const { return buf.size() - off; }
  };

  void read(int end, asio::mutable_buffer b, ByteTransport::Handler h) {
    if (closed_[end]) return complete(std::move(h), asio::error::operation_aborted, 0);
    dir_[end].rbuf = b;
    dir_[end].rh = std::move(h);
    progress();
  }
  void write(int end, asio::const_buffer b, ByteTransport::Handler h) {
    if (closed_[end]) return complete(std::move(h), asio::error::operation_aborted, 0);
    if (closed_[1 - end]) return complete(std::move(h), asio::error::broken_pipe, 0);
    auto& d = dir_[1 - end];
    d.wbuf = b;
    d.wdone = 0;
    d.wh = std::move(h);
    progress();
  }
  void close(int end) {
    if (closed_[end]) return;
    closed_[end] = true;
    auto& in = dir_[end];
    if (in.rh) complete(std::exchange(in.rh, nullptr), asio::error::operation_aborted, 0);
    if (in.wh) complete(std::exchange(in.wh, nullptr), asio::error::broken_pipe, 0);
    in.buf.clear();
    in.off = 0;
    auto& out = dir_[1 - end];
    if (out.wh) complete(std::exchange(out.wh, nullptr), asio::error::operation_aborted, 0);
    progress();
  }
  bool closed(int end) const { return closed_[end]; }
  // Stops delivering to `end` (its reads never complete) until resumed: a peer that stops reading.
  void stall(int end, bool on) {
    stalled_[end] = on;
    progress();
  }

 private:
  void complete(ByteTransport::Handler h, error_code ec, std::size_t n) {
    asio::post(io_, [h = std::move(h), ec, n] { h(ec, n); });
  }
  void progress() {
    for (int end = 0; end < 2; ++end) {
      auto& d = dir_[end];
      if (d.wh) {
        const std::size_t room = capacity_ > d.size() ? capacity_ - d.size() : 0;
        const std::size_t n = std::min(room, d.wbuf.size() - d.wdone);
        if (n > 0) {
          const auto* p = static_cast<const std::uint8_t*>(d.wbuf.data()) + d.wdone;
          d.buf.insert(d.buf.end(), p, p + n);
          d.wdone += n;
        }
        if (d.wdone == d.wbuf.size()) complete(std::exchange(d.wh, nullptr), {}, d.wdone);
      }
      if (d.rh && !stalled_[end]) {
        if (d.size() > 0) {
          const std::size_t n = std::min(d.size(), d.rbuf.size());
          std::memcpy(d.rbuf.data(), d.buf.data() + d.off, n);
          d.off += n;
          if (d.off == d.buf.size()) {
            d.buf.clear();
            d.off = 0;
          } else if (d.off > 256 * 1024) {
            d.buf.erase(d.buf.begin(), d.buf.begin() + static_cast<std::ptrdiff_t>(d.off));
            d.off = 0;
          }
          complete(std::exchange(d.rh, nullptr), {}, n);
          // Room was made: a blocked writer may continue.
          if (d.wh) {
            progress();
            return;
          }
        } else if (closed_[1 - end]) {
          complete(std::exchange(d.rh, nullptr), asio::error::eof, 0);
        }
      }
    }
  }

  asio::io_context& io_;
  std::size_t capacity_;
  Dir dir_[2];
  bool closed_[2] = {false, false};
  bool stalled_[2] = {false, false};
};

class PipeEnd final : public ByteTransport {
 public:
  PipeEnd(std::shared_ptr<MemoryPipe> pipe, int end, std::string name)
      : pipe_(std::move(pipe)), end_(end), name_(std::move(name)) {}
  ~PipeEnd() override { pipe_->close(end_); }
  void async_read_some(asio::mutable_buffer b, Handler h) override {
    pipe_->read(end_, b, std::move(h));
  }
  void async_write(asio::const_buffer b, Handler h) override {
    pipe_->write(end_, b, std::move(h));
  }
  void close() override { pipe_->close(end_); }
  std::string describe() const override { return name_; }

 private:
  std::shared_ptr<MemoryPipe> pipe_;
  int end_;
  std::string name_;
};

// Returns {end 0, end 1} of a new pipe and the pipe itself (for stall()).
inline std::pair<ByteTransportPtr, ByteTransportPtr> make_pipe(
    asio::io_context& io, std::shared_ptr<MemoryPipe>* out = nullptr,
    std::size_t capacity = 256 * 1024, const std::string& name = "pipe") {
  auto pipe = std::make_shared<MemoryPipe>(io, capacity);
  if (out) *out = pipe;
  return {std::make_unique<PipeEnd>(pipe, 0, name + "/0"),
          std::make_unique<PipeEnd>(pipe, 1, name + "/1")};
}

// Cuts the connection once `write_budget` bytes were written or `read_budget` bytes were read
// (a write that crosses the budget delivers only its prefix: the cut lands mid-frame). The budgets
// come from the test's seeded generator, so a failure replays.
class FlakyTransport final : public ByteTransport {
 public:
  FlakyTransport(asio::io_context& io, ByteTransportPtr inner, std::size_t write_budget,
                 std::size_t read_budget)
      : io_(io), inner_(std::move(inner)), wb_(write_budget), rb_(read_budget) {}
  void async_read_some(asio::mutable_buffer b, Handler h) override {
    if (rb_ == 0) return cut(std::move(h));
    b = asio::buffer(b.data(), std::min(b.size(), rb_));
    inner_->async_read_some(b, [this, h = std::move(h)](error_code ec, std::size_t n) {
      if (!ec) rb_ -= n;
      h(ec, n);
    });
  }
  void async_write(asio::const_buffer b, Handler h) override {
    if (b.size() <= wb_) {
      wb_ -= b.size();
      return inner_->async_write(b, std::move(h));
    }
    if (wb_ == 0) return cut(std::move(h));
    const std::size_t prefix = wb_;
    wb_ = 0;
    inner_->async_write(asio::buffer(b.data(), prefix),
                        [this, h = std::move(h)](error_code, std::size_t) { cut(h); });
  }
  void close() override { inner_->close(); }
  std::string describe() const override { return "flaky(" + inner_->describe() + ")"; }

 private:
  void cut(Handler h) {
    inner_->close();
    asio::post(io_, [h = std::move(h)] { h(asio::error::connection_reset, 0); });
  }
  asio::io_context& io_;
  ByteTransportPtr inner_;
  std::size_t wb_, rb_;
};

}  // namespace kb::tunnel::testing
