#pragma once
// SshConnection: one SSH connection (libssh 0.10, driven by Boost.Asio) to a login host, shared by
// every kernel that goes through that host; hands out direct-tcpip channels as ByteTransports.
//
// Threading: single-threaded. create(), every member function, every ByteTransport it hands out,
// and every handler/observer run on the thread that runs the io_context given to create() (libssh
// is not thread-safe per session). Handlers are never invoked from inside the initiating call.
//
// How it drives libssh: Asio owns the TCP socket (async resolve/connect with timeout, TCP_NODELAY,
// SO_KEEPALIVE); libssh gets a dup of the fd (SSH_OPTIONS_FD) in non-blocking mode; whenever a
// libssh step says SSH_AGAIN the socket gets an async_wait for read and/or write as
// ssh_get_poll_flags() says. Nothing spins, sleeps or blocks the loop. See docs/ssh-transport.md.
#include "link/transport.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

namespace kb::tunnel {

struct SshOptions {
  std::string host;  // login host: name or address; also the name looked up in known_hosts
  uint16_t port = 22;
  std::string user;
  std::string identity_file;     // private key (OpenSSH format, no passphrase)
  std::string known_hosts_file;  // the ONLY place host keys are trusted from (strict checking)
  std::string ciphers;           // e.g. "aes128-gcm@openssh.com"; empty = libssh's default list
  std::chrono::milliseconds connect_timeout{15000};  // resolve + TCP + key exchange + auth
  std::chrono::milliseconds keepalive_interval{15000};
  int keepalive_count_max = 2;  // dead after keepalive_interval * keepalive_count_max of silence
  std::chrono::milliseconds backoff_min{500}, backoff_max{10000};  // reconnect delay, full jitter
  // How long an async_open_channel waits for the connection to be (re)established before it fails
  // with the last connect error. 0 = wait until connected, permanently failed or shut down.
  std::chrono::milliseconds open_timeout{0};
};

// Errors of this transport (category "kb.ssh"). The data path reports boost::asio::error::eof
// (peer closed the channel), operation_aborted (closed locally / shutdown), broken_pipe (write
// after the peer closed the channel) and connection_lost (the SSH connection died).
enum class SshError {
  connection_lost = 1,   // SSH connection died (socket error, sshd gone, keepalive timeout)
  connect_failed,        // could not resolve/connect/handshake (transient; retried with backoff)
  host_key_unknown,      // server key not in known_hosts (permanent)
  host_key_changed,      // known_hosts has another key for this host (permanent)
  host_key_error,        // known_hosts unreadable / key unusable (permanent)
  auth_denied,           // public key refused (permanent)
  identity_unreadable,   // identity file missing or unparsable (permanent)
  channel_open_refused,  // sshd refused the direct-tcpip channel (e.g. permitopen)
  open_timeout,          // connection not established within SshOptions::open_timeout
  shut_down,             // the connection was shut down (also reported as operation_aborted)
};
const boost::system::error_category& ssh_category();
boost::system::error_code make_error_code(SshError e);

struct SshCounters {
  uint64_t bytes_in = 0;    // bytes read from the TCP socket (all connections so far)
  uint64_t bytes_out = 0;   // bytes written to the TCP socket
  uint64_t connects = 0;    // successful (re)connects
  uint64_t reconnects = 0;  // connects after the first one
  uint64_t channels_opened = 0;
  uint64_t channels_open = 0;  // currently open
};

class SshConnection : public std::enable_shared_from_this<SshConnection> {
 public:
  // idle: not connected, connects on demand. connecting: first attempt. connected. reconnecting:
  // lost or attempt failed, retrying with backoff. failed: permanent (host key, auth) — no retry.
  enum class State { idle, connecting, connected, reconnecting, failed };
  using OpenHandler =
      std::function<void(boost::system::error_code, std::string message, ByteTransportPtr)>;
  using StateObserver = std::function<void(State, const std::string& reason)>;

  // Does no I/O; the first async_open_channel() (or connect()) starts connecting.
  static std::shared_ptr<SshConnection> create(boost::asio::io_context& ioc, SshOptions options);
  ~SshConnection();  // shuts down
  SshConnection(const SshConnection&) = delete;
  SshConnection& operator=(const SshConnection&) = delete;

  // Opens a direct-tcpip channel to host:port as seen from the login host. The handler gets a
  // transport, or an error plus a message a person can act on (host key, auth, sshd refusal...).
  // Waits through reconnects (see SshOptions::open_timeout). Each transport keeps this connection
  // alive; closing/destroying it sends EOF + close on the channel.
  void async_open_channel(std::string host, uint16_t port, OpenHandler handler);
  // Start connecting now (otherwise the first async_open_channel does). No-op unless idle.
  void connect();
  // Observers are called on every state change, in registration order.
  void on_state_change(StateObserver observer);

  State state() const;
  std::string last_error() const;  // the last failure, human-readable; empty if none
  const SshOptions& options() const;
  SshCounters counters() const;
  std::string describe() const;  // "user@host:port", for logs

  // Fails every pending open and channel operation with operation_aborted, closes the connection
  // (SSH_MSG_DISCONNECT), stops reconnecting. Idempotent. The state becomes idle unless failed.
  void shutdown();
  bool is_shut_down() const;

  struct Core;  // implementation (libssh handles, channels); defined in ssh_connection.cpp

 private:
  explicit SshConnection(std::shared_ptr<Core> core);
  std::shared_ptr<Core> core_;
};

const char* to_string(SshConnection::State s);

// True for errors no retry can cure (host key, authentication, identity file): the caller should
// stop and tell a person, not back off and try again.
bool is_permanent_ssh_error(const boost::system::error_code& ec);

// SshConnectionPool: hands out the one shared SshConnection per host:port:user, creating it on
// first use and replacing it once it has permanently failed or was shut down. Same thread as the
// io_context.
class SshConnectionPool {
 public:
  explicit SshConnectionPool(boost::asio::io_context& ioc) : ioc_(ioc) {}
  ~SshConnectionPool() { shutdown_all(); }
  // The first caller's options win for a key; a later caller with a different identity,
  // known_hosts or cipher list gets the existing connection and a warning in the log.
  std::shared_ptr<SshConnection> get(const SshOptions& options);
  void shutdown_all();
  std::size_t size() const { return connections_.size(); }

 private:
  boost::asio::io_context& ioc_;
  std::map<std::string, std::shared_ptr<SshConnection>> connections_;
};

}  // namespace kb::tunnel

namespace boost::system {
template <>
struct is_error_code_enum<kb::tunnel::SshError> : std::true_type {};
}  // namespace boost::system
