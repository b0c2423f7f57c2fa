#pragma once
// ByteTransport over a connected Asio TCP socket (the agent's accepted bridge connection, tests,
// benchmarks). Sets TCP_NODELAY. Runs on the socket's io_context thread, like every ByteTransport.
#include <boost/asio/ip/tcp.hpp>

#include "link/transport.hpp"

namespace kb::tunnel {

ByteTransportPtr make_tcp_transport(boost::asio::ip::tcp::socket socket);

// TCP_NODELAY on a local socket (best effort: a failure is logged, never thrown). The link adopts
// every local socket through this, since Jupyter's small request/reply messages must not wait for
// Nagle's algorithm.
void set_low_latency(boost::asio::ip::tcp::socket& socket);

// Ask the kernel to acknowledge what this socket received at once instead of delaying the ACK
// (Linux TCP_QUICKACK; it is not sticky, so it is re-armed after every read). Used on the link's
// sockets toward sshd: sshd leaves Nagle's algorithm on for a forwarding-only session, so its small
// segments (channel window adjusts, the peer's credit and ack frames) wait for our ACK of the
// previous one; with delayed ACKs that costs up to 40 ms each time a stream waits for credit and
// held bulk throughput below 1.4 Gbit/s. Best effort: no-op where the option does not exist.
void request_quick_ack(int fd);

}  // namespace kb::tunnel
