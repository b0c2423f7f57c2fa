#pragma once
// ByteTransport over a connected Asio TCP socket (the agent's accepted bridge connection, tests,
// benchmarks). Sets TCP_NODELAY. Runs on the socket's io_context thread, like every ByteTransport.
#include <boost/asio/ip/tcp.hpp>

#include "tunnel/transport.hpp"

namespace kb::tunnel {

ByteTransportPtr make_tcp_transport(boost::asio::ip::tcp::socket socket);

// TCP_NODELAY on a local socket (best effort: a failure is logged, never thrown). The link adopts
// every local socket through this, since Jupyter's small request/reply messages must not wait for
// Nagle's algorithm.
void set_low_latency(boost::asio::ip::tcp::socket& socket);

}  // namespace kb::tunnel
