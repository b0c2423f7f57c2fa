#include "link/tcp_transport.hpp"

#include <spdlog/spdlog.h>

#include <boost/asio/write.hpp>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

namespace kb::tunnel {

namespace {

std::string endpoint_text(const boost::asio::ip::tcp::socket& s, bool remote) {
  boost::system::error_code ec;
  auto ep = remote ? s.remote_endpoint(ec) : s.local_endpoint(ec);
  if (ec) return "?";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

class TcpTransport final : public ByteTransport {
 public:
  explicit TcpTransport(boost::asio::ip::tcp::socket socket) : socket_(std::move(socket)) {
    set_low_latency(socket_);
    description_ = "tcp:" + endpoint_text(socket_, false) + "->" + endpoint_text(socket_, true);
  }
  ~TcpTransport() override { close(); }

  void async_read_some(boost::asio::mutable_buffer buffer, Handler handler) override {
    // The descriptor, not `this`: a completion may still run after the transport is destroyed
    // (QUICKACK on a reused descriptor would be harmless; touching a dead object would not).
    socket_.async_read_some(buffer, [fd = socket_.native_handle(), h = std::move(handler)](
                                        boost::system::error_code ec, std::size_t n) mutable {
      if (!ec) request_quick_ack(fd);
      h(ec, n);
    });
  }
  void async_write(boost::asio::const_buffer buffer, Handler handler) override {
    boost::asio::async_write(socket_, buffer, std::move(handler));
  }
  void close() override {
    if (!socket_.is_open()) return;
    boost::system::error_code ec;
    socket_.shutdown(boost::asio::ip::tcp::socket::shutdown_both, ec);
    socket_.close(ec);
  }
  std::string describe() const override { return description_; }

 private:
  boost::asio::ip::tcp::socket socket_;
  std::string description_;
};

}  // namespace

ByteTransportPtr make_tcp_transport(boost::asio::ip::tcp::socket socket) {
  return std::make_unique<TcpTransport>(std::move(socket));
}

void set_low_latency(boost::asio::ip::tcp::socket& socket) {
  boost::system::error_code ec;
  socket.set_option(boost::asio::ip::tcp::no_delay(true), ec);
  if (ec) spdlog::warn("link: cannot set TCP_NODELAY on a socket: {}", ec.message());
}

void request_quick_ack(int fd) {
#ifdef TCP_QUICKACK
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
#else
  (void)fd;
#endif
}

}  // namespace kb::tunnel
