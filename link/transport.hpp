#pragma once
// ByteTransport: the seam between the link protocol and whatever carries its bytes (an SSH
// direct-tcpip channel on the bridge side, an accepted TCP socket on the agent side, an in-memory
// pipe in tests). All calls and all handlers run on the owning io_context's single thread.
#include <boost/asio/buffer.hpp>
#include <boost/system/error_code.hpp>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

namespace kb::tunnel {

class ByteTransport {
 public:
  using Handler = std::function<void(boost::system::error_code, std::size_t)>;

  virtual ~ByteTransport() = default;

  // At most one read and one write outstanding at a time. A read completes with >0 bytes, or with
  // an error (boost::asio::error::eof when the peer closed cleanly). The buffer must stay valid
  // until the handler runs.
  virtual void async_read_some(boost::asio::mutable_buffer buffer, Handler handler) = 0;
  // Writes the whole buffer (or fails); the handler gets the byte count.
  virtual void async_write(boost::asio::const_buffer buffer, Handler handler) = 0;
  // Stops both directions; outstanding handlers complete with operation_aborted. Idempotent.
  virtual void close() = 0;
  // For logs: "ssh:login.example:22->10.0.0.3:40123" or similar. Never contains secrets.
  virtual std::string describe() const = 0;
};

using ByteTransportPtr = std::unique_ptr<ByteTransport>;

}  // namespace kb::tunnel
