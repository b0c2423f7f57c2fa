// SshConnection: libssh 0.10 driven by Boost.Asio. Everything here runs on the io_context's single
// thread; see ssh_connection.hpp for the contract and docs/ssh-transport.md for the design.
//
// How libssh is driven (facts about libssh 0.10.6 this code relies on):
//  * Asio owns the TCP socket; libssh gets a dup() of its fd through SSH_OPTIONS_FD, so the two
//  never
//    close each other's descriptor (libssh closes its copy itself on some errors).
//  * libssh puts the fd back into blocking mode when it sees the connect complete; we put it back
//  to
//    non-blocking right after, because a blocking send() of a big output buffer would stall the
//    loop. libssh only writes after its own poll() reported POLLOUT with no write since, so a
//    non-blocking send always has room for at least part of the buffer (libssh treats EAGAIN on
//    send as fatal).
//  * libssh reads at most 4 KiB per poll round; after each round we poll() the fd ourselves and go
//    on while it is readable (bounded, then we yield with a post), because Asio's epoll reactor is
//    edge-triggered: an async_wait armed while data is already queued would never fire.
//  * Once authenticated, the session's poll handle is moved into an ssh_event, and
//    ssh_event_dopoll(event, 0) is the one "pump" that reads, decrypts and dispatches packets.
//    Channel data arrives through per-channel callbacks: it goes straight into the buffer of a
//    pending read, or stays in libssh's channel buffer (libssh re-opens a channel's window only as
//    that buffer drains, so an unread channel holds at most ~1.28 MB and never stalls the others).
//  * ssh_channel_write() copies into libssh's output buffer up to the peer's window and returns a
//    partial count (0 when the window is exhausted); we keep the remainder and retry when
//    ssh_channel_window_size() grows. New data is only handed to libssh while its output buffer is
//    empty, which bounds the memory held per connection.
//  * ssh_send_keepalive() always returns SSH_OK and, because its global-request state only resets
//    when called again, every other call merely consumes the previous reply without sending. We
//    look at the packet counter to tell and call it a second time when nothing went out.
#include "ssh/connection.hpp"
#include "common/backoff.hpp"
#include "link/tcp_transport.hpp"

#include <libssh/callbacks.h>
#include <libssh/libssh.h>
#include <libssh/server.h>  // ssh_send_keepalive lives here in 0.10
#include <spdlog/spdlog.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <vector>

namespace kb::tunnel {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

// ------------------------------------------------------------------------------------ errors
namespace {

class SshCategory final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "kb.ssh"; }
  std::string message(int ev) const override {
    switch (static_cast<SshError>(ev)) {
      case SshError::connection_lost:
        return "SSH connection lost";
      case SshError::connect_failed:
        return "could not connect to the SSH server";
      case SshError::host_key_unknown:
        return "SSH host key not in known_hosts";
      case SshError::host_key_changed:
        return "SSH host key changed";
      case SshError::host_key_error:
        return "SSH host key could not be checked";
      case SshError::auth_denied:
        return "SSH public key refused";
      case SshError::identity_unreadable:
        return "SSH identity file unreadable";
      case SshError::channel_open_refused:
        return "SSH server refused the channel";
      case SshError::open_timeout:
        return "SSH connection not established in time";
      case SshError::shut_down:
        return "SSH connection shut down";
    }
    return "unknown SSH error";
  }
};

// RAII for libssh handles.
struct SessionFree {
  void operator()(ssh_session s) const { ssh_free(s); }
};
struct ChannelFree {
  void operator()(ssh_channel c) const { ssh_channel_free(c); }
};
struct KeyFree {
  void operator()(ssh_key k) const { ssh_key_free(k); }
};
struct EventFree {
  void operator()(ssh_event e) const { ssh_event_free(e); }
};
struct CharFree {
  void operator()(char* p) const { ssh_string_free_char(p); }
};
using SessionPtr = std::unique_ptr<ssh_session_struct, SessionFree>;
using ChannelPtr = std::unique_ptr<ssh_channel_struct, ChannelFree>;
using KeyPtr = std::unique_ptr<ssh_key_struct, KeyFree>;
using EventPtr = std::unique_ptr<ssh_event_struct, EventFree>;
using CStringPtr = std::unique_ptr<char, CharFree>;

constexpr std::size_t kMaxReadChunk =
    256 * 1024;  // keeps libssh from growing a window past ~1.28 MB
constexpr std::size_t kMaxWriteChunk = 64 * 1024;  // per ssh_channel_write call
constexpr int kPumpBudget = 64;                    // socket rounds per handler before yielding

std::string ms_text(std::chrono::milliseconds d) {
  if (d.count() % 1000 == 0) return std::to_string(d.count() / 1000) + " s";
  return std::to_string(d.count()) + " ms";
}

// "SHA256:..." as OpenSSH prints it; empty if the key cannot be hashed.
std::string sha256_fingerprint(ssh_key key) {
  unsigned char* hash = nullptr;
  size_t len = 0;
  if (ssh_get_publickey_hash(key, SSH_PUBLICKEY_HASH_SHA256, &hash, &len) != SSH_OK) return {};
  CStringPtr fp(ssh_get_fingerprint_hash(SSH_PUBLICKEY_HASH_SHA256, hash, len));
  ssh_clean_pubkey_hash(&hash);
  return fp ? std::string(fp.get()) : std::string();
}

// Readiness of fd right now (never blocks).
short poll_now(int fd, short events) {
  pollfd p{fd, events, 0};
  int r = ::poll(&p, 1, 0);
  return r > 0 ? p.revents : 0;
}

void ensure_nonblocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL, 0);
  if (fl >= 0 && !(fl & O_NONBLOCK)) ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

}  // namespace

const boost::system::error_category& ssh_category() {
  static const SshCategory category;
  return category;
}

error_code make_error_code(SshError e) {
  return error_code(static_cast<int>(e), ssh_category());
}

const char* to_string(SshConnection::State s) {
  switch (s) {
    case SshConnection::State::idle:
      return "idle";
    case SshConnection::State::connecting:
      return "connecting";
    case SshConnection::State::connected:
      return "connected";
    case SshConnection::State::reconnecting:
      return "reconnecting";
    case SshConnection::State::failed:
      return "failed";
  }
  return "?";
}

// ------------------------------------------------------------------------------ core state
namespace {

// One direct-tcpip channel; shared by the Core (while open) and its transport.
struct ChannelState {
  uint64_t id = 0;
  std::string label;  // "ssh:user@host:port->target#id"
  ChannelPtr channel;
  ssh_channel_callbacks_struct callbacks{};
  bool remote_eof = false;
  bool remote_closed = false;
  bool closed_locally = false;
  error_code gone;        // set when the channel can no longer be used (connection lost, shutdown)
  uint32_t buffered = 0;  // bytes libssh holds for us (last data callback minus what we read since)

  bool reading = false;
  asio::mutable_buffer read_buffer;
  ByteTransport::Handler read_handler;

  bool writing = false;
  const uint8_t* write_data = nullptr;
  std::size_t write_left = 0;
  std::size_t write_total = 0;
  ByteTransport::Handler write_handler;

  asio::io_context* ioc = nullptr;

  void complete_read(error_code ec, std::size_t n) {
    reading = false;
    asio::post(*ioc, [h = std::move(read_handler), ec, n] { h(ec, n); });
    read_handler = nullptr;
  }
  void complete_write(error_code ec, std::size_t n) {
    writing = false;
    write_data = nullptr;
    write_left = 0;
    asio::post(*ioc, [h = std::move(write_handler), ec, n] { h(ec, n); });
    write_handler = nullptr;
  }
};

struct OpenRequest {
  uint64_t id = 0;
  std::string host;
  uint16_t port = 0;
  SshConnection::OpenHandler handler;
  std::unique_ptr<asio::steady_timer> timer;  // open_timeout while waiting for the connection
  std::shared_ptr<ChannelState> state;        // created when the request is sent to sshd
};

// libssh channel callbacks: they only move bytes into pending reads and set flags; all other work
// happens in Core::service(), so they are safe whenever libssh decides to process packets.
int on_channel_data(ssh_session, ssh_channel, void* data, uint32_t len, int is_stderr, void* user) {
  auto* cs = static_cast<ChannelState*>(user);
  if (is_stderr) return static_cast<int>(len);  // direct-tcpip has no stderr; never let it pile up
  uint32_t consumed = 0;
  if (cs->reading && cs->read_buffer.size() > 0) {
    consumed = static_cast<uint32_t>(std::min<std::size_t>(len, cs->read_buffer.size()));
    std::memcpy(cs->read_buffer.data(), data, consumed);
    cs->complete_read({}, consumed);
  }
  cs->buffered = len - consumed;
  return static_cast<int>(consumed);
}

void on_channel_eof(ssh_session, ssh_channel, void* user) {
  static_cast<ChannelState*>(user)->remote_eof = true;
}

void on_channel_close(ssh_session, ssh_channel, void* user) {
  auto* cs = static_cast<ChannelState*>(user);
  cs->remote_eof = true;
  cs->remote_closed = true;
}

}  // namespace

struct SshConnection::Core : std::enable_shared_from_this<SshConnection::Core> {
  enum class Phase { down, resolving, tcp_connecting, handshaking, authenticating, ready };

  Core(asio::io_context& io, SshOptions o)
      : ioc(io),
        opt(std::move(o)),
        resolver(io),
        socket(io),
        connect_timer(io),
        backoff_timer(io),
        keepalive_timer(io),
        backoff({opt.backoff_min, opt.backoff_max, 2.0, kb::Jitter::full}, kb::backoff_seed()) {
    label = opt.user + "@" + opt.host + ":" + std::to_string(opt.port);
  }

  asio::io_context& ioc;
  SshOptions opt;
  std::string label;
  std::weak_ptr<SshConnection> owner;

  Phase phase = Phase::down;
  State st = State::idle;
  std::string last_err;
  SshError failure = SshError::connection_lost;  // the permanent error once state is failed
  std::vector<StateObserver> observers;
  bool shut = false;
  bool eager = false;  // reconnect without pending opens: channels were open when it dropped
  bool ever_connected = false;
  int attempt = 0;   // attempts since the last success
  uint64_t gen = 0;  // bumped on every teardown; stale handlers compare and return

  tcp::resolver resolver;
  tcp::socket socket;
  asio::steady_timer connect_timer, backoff_timer, keepalive_timer;
  int libssh_fd = -1;  // our dup handed to libssh (libssh may close it)
  bool connect_called = false;
  SessionPtr session;
  EventPtr event;
  KeyPtr identity;
  ssh_counter_struct sock_ctr{}, raw_ctr{};
  SshCounters totals;
  bool read_armed = false, write_armed = false, service_posted = false;
  Clock::time_point last_rx;
  uint64_t last_rx_bytes = 0;
  uint64_t open_check_packets = ~uint64_t{0};

  uint64_t next_id = 1;
  std::deque<std::shared_ptr<OpenRequest>> waiting;   // not yet sent to sshd
  std::vector<std::shared_ptr<OpenRequest>> opening;  // sent, waiting for sshd's answer
  std::map<uint64_t, std::shared_ptr<ChannelState>> channels;
  kb::Backoff backoff;  // reconnect delays; `attempt` is its step

  // ---------------------------------------------------------------------------- state
  void set_state(State s, const std::string& reason) {
    if (s == st && s != State::reconnecting) return;
    st = s;
    for (auto& obs : observers) {
      asio::post(ioc, [obs, s, reason] { obs(s, reason); });
    }
  }

  bool dead() const {
    return !session || (ssh_get_status(session.get()) & (SSH_CLOSED | SSH_CLOSED_ERROR)) != 0;
  }

  std::string session_error() const {
    const char* e = session ? ssh_get_error(session.get()) : nullptr;
    return (e && *e) ? std::string(e) : std::string("connection closed");
  }

  // --------------------------------------------------------------------------- connect
  void want_connection() {
    if (shut || st == State::failed) return;
    if (phase != Phase::down) return;
    if (backoff_timer.expiry() > Clock::now() && st == State::reconnecting)
      return;  // timer pending
    start_attempt();
  }

  void start_attempt() {
    if (shut) return;
    ++gen;
    const uint64_t g = gen;
    const bool first = !ever_connected && attempt == 0;
    ++attempt;
    if (first) {
      set_state(State::connecting, "");
    } else if (st != State::reconnecting) {
      set_state(State::reconnecting, last_err);
    }
    if (!identity) {
      ssh_key key = nullptr;
      int rc =
          ssh_pki_import_privkey_file(opt.identity_file.c_str(), nullptr, nullptr, nullptr, &key);
      if (rc != SSH_OK || key == nullptr) {
        fail(SshError::identity_unreadable,
             "cannot load SSH identity file " + opt.identity_file +
                 " (missing, unreadable, passphrase-protected or not a private key); "
                 "point identity_file at the bridge's unencrypted private key",
             true);
        return;
      }
      identity.reset(key);
    }
    phase = Phase::resolving;
    spdlog::info("ssh {}: connecting (attempt {})", label, attempt);
    connect_timer.expires_after(opt.connect_timeout);
    connect_timer.async_wait([self = shared_from_this(), g](error_code ec) {
      if (ec || g != self->gen) return;
      self->fail(SshError::connect_failed,
                 "connecting to " + self->opt.host + ":" + std::to_string(self->opt.port) +
                     " timed out after " + ms_text(self->opt.connect_timeout) + " (" +
                     self->phase_name() + ")",
                 false);
    });
    resolver.async_resolve(
        opt.host, std::to_string(opt.port),
        [self = shared_from_this(), g](error_code ec, tcp::resolver::results_type results) {
          if (g != self->gen) return;
          if (ec) {
            self->fail(SshError::connect_failed,
                       "cannot resolve " + self->opt.host + ": " + ec.message(), false);
            return;
          }
          self->phase = Phase::tcp_connecting;
          asio::async_connect(self->socket, results,
                              [self, g](error_code ec2, const tcp::endpoint&) {
                                if (g != self->gen) return;
                                self->on_tcp_connected(ec2);
                              });
        });
  }

  std::string phase_name() const {
    switch (phase) {
      case Phase::down:
        return "down";
      case Phase::resolving:
        return "resolving the host name";
      case Phase::tcp_connecting:
        return "TCP connect";
      case Phase::handshaking:
        return "SSH key exchange";
      case Phase::authenticating:
        return "authentication";
      case Phase::ready:
        return "connected";
    }
    return "?";
  }

  void on_tcp_connected(error_code ec) {
    if (ec) {
      fail(SshError::connect_failed,
           "cannot connect to " + opt.host + ":" + std::to_string(opt.port) + ": " + ec.message(),
           false);
      return;
    }
    error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    socket.set_option(asio::socket_base::keep_alive(true), ignored);

    ssh_session s = ssh_new();
    if (s == nullptr) {
      fail(SshError::connect_failed, "libssh could not allocate a session (out of memory)", false);
      return;
    }
    session.reset(s);
    int fd = ::dup(socket.native_handle());
    if (fd < 0) {
      fail(SshError::connect_failed,
           std::string("cannot duplicate the socket descriptor: ") + std::strerror(errno), false);
      return;
    }
    libssh_fd = fd;
    connect_called = false;
    ssh_set_counters(s, &sock_ctr, &raw_ctr);

    const int port = opt.port;
    const int strict = 1;
    const bool no_config = false;
    int rc = SSH_OK;
    rc |= ssh_options_set(s, SSH_OPTIONS_FD, &fd);
    rc |= ssh_options_set(s, SSH_OPTIONS_HOST, opt.host.c_str());
    rc |= ssh_options_set(s, SSH_OPTIONS_PORT, &port);
    rc |= ssh_options_set(s, SSH_OPTIONS_USER, opt.user.c_str());
    // Do not read ~/.ssh/config or /etc/ssh/ssh_config: the options are the whole truth.
    rc |= ssh_options_set(s, SSH_OPTIONS_PROCESS_CONFIG, &no_config);
    rc |= ssh_options_set(s, SSH_OPTIONS_STRICTHOSTKEYCHECK, &strict);
    // The given file is the only trust anchor: also use it as the "global" file, so
    // /etc/ssh/ssh_known_hosts can never vouch for a key.
    rc |= ssh_options_set(s, SSH_OPTIONS_KNOWNHOSTS, opt.known_hosts_file.c_str());
    rc |= ssh_options_set(s, SSH_OPTIONS_GLOBAL_KNOWNHOSTS, opt.known_hosts_file.c_str());
    if (rc != SSH_OK) {
      fail(SshError::connect_failed, "libssh rejected an option: " + session_error(), true);
      return;
    }
    if (!opt.ciphers.empty()) {
      if (ssh_options_set(s, SSH_OPTIONS_CIPHERS_C_S, opt.ciphers.c_str()) != SSH_OK ||
          ssh_options_set(s, SSH_OPTIONS_CIPHERS_S_C, opt.ciphers.c_str()) != SSH_OK) {
        fail(SshError::connect_failed,
             "cipher list \"" + opt.ciphers + "\" is not supported by libssh: " + session_error() +
                 "; use e.g. aes128-gcm@openssh.com or leave it empty",
             true);
        return;
      }
    }
    ssh_set_blocking(s, 0);
    phase = Phase::handshaking;
    drive_handshake(gen);
  }

  // Key exchange, host key check and authentication, one non-blocking step at a time.
  void drive_handshake(uint64_t g) {
    bool exhausted = true;
    for (int round = 0; round < kPumpBudget; ++round) {
      if (g != gen) return;
      if (phase == Phase::handshaking) {
        int rc = ssh_connect(session.get());
        connect_called = true;
        ensure_nonblocking(socket.native_handle());
        if (rc == SSH_OK) {
          if (!verify_host_key()) return;
          phase = Phase::authenticating;
          continue;
        }
        if (rc == SSH_ERROR) {
          fail(SshError::connect_failed,
               "SSH handshake with " + opt.host + ":" + std::to_string(opt.port) +
                   " failed: " + session_error(),
               false);
          return;
        }
      } else if (phase == Phase::authenticating) {
        int rc = ssh_userauth_publickey(session.get(), nullptr, identity.get());
        if (rc == SSH_AUTH_SUCCESS) {
          on_ready();
          return;
        }
        if (rc == SSH_AUTH_DENIED || rc == SSH_AUTH_PARTIAL) {
          fail(SshError::auth_denied,
               opt.user + "@" + opt.host + ":" + std::to_string(opt.port) +
                   " refused the public key of identity file " + opt.identity_file +
                   "; ask the site to add " + opt.identity_file +
                   ".pub to the authorized_keys of " + opt.user + ", or fix the user/identity",
               true);
          return;
        }
        if (rc == SSH_AUTH_ERROR) {
          fail(SshError::connect_failed,
               "SSH authentication with " + label + " failed: " + session_error(), false);
          return;
        }
      } else {
        return;
      }
      // SSH_AGAIN: go on only while the socket can make progress right now.
      if (!socket_ready_now()) {
        exhausted = false;
        break;
      }
    }
    if (exhausted) {
      asio::post(ioc, [self = shared_from_this(), g] { self->drive_handshake(g); });
    }
    arm_waits(g);
  }

  // Strict host key policy; false (and a permanent failure) unless known_hosts has this exact key.
  bool verify_host_key() {
    ssh_key raw = nullptr;
    if (ssh_get_server_publickey(session.get(), &raw) != SSH_OK || raw == nullptr) {
      fail(SshError::host_key_error,
           "the SSH server at " + opt.host + ":" + std::to_string(opt.port) +
               " sent no usable host key: " + session_error(),
           true);
      return false;
    }
    KeyPtr key(raw);
    const std::string fp = sha256_fingerprint(key.get());
    const char* type_c = ssh_key_type_to_char(ssh_key_type(key.get()));
    const std::string type = type_c ? type_c : "unknown";
    const std::string where =
        opt.port == 22 ? opt.host : "[" + opt.host + "]:" + std::to_string(opt.port);
    const std::string presented = "the server presented a " + type + " key with fingerprint " + fp;
    switch (ssh_session_is_known_server(session.get())) {
      case SSH_KNOWN_HOSTS_OK:
        spdlog::info("ssh {}: host key {} {} matches {}", label, type, fp, opt.known_hosts_file);
        return true;
      case SSH_KNOWN_HOSTS_CHANGED:
        fail(
            SshError::host_key_changed,
            "host key for " + where + " has CHANGED: " + presented + ", which is not the key in " +
                opt.known_hosts_file +
                ". Someone may be intercepting the connection, or the host was reinstalled: verify "
                "the fingerprint with the site and replace the entry for " +
                where + " in " + opt.known_hosts_file + ". Refusing to connect.",
            true);
        return false;
      case SSH_KNOWN_HOSTS_OTHER:
        fail(SshError::host_key_changed,
             "host key for " + where + " does not match: " + presented + ", but " +
                 opt.known_hosts_file +
                 " holds a key of another type for this host. Verify the fingerprint with the site "
                 "and update the entry for " +
                 where + " in " + opt.known_hosts_file + ". Refusing to connect.",
             true);
        return false;
      case SSH_KNOWN_HOSTS_UNKNOWN:
        fail(SshError::host_key_unknown,
             "host " + where + " is not in known_hosts file " + opt.known_hosts_file + ": " +
                 presented + ". Verify the fingerprint with the site and add the host's key to " +
                 opt.known_hosts_file + " (e.g. a line \"" + where + " " + type +
                 " <base64 key>\"). Refusing to connect.",
             true);
        return false;
      case SSH_KNOWN_HOSTS_NOT_FOUND:
        fail(SshError::host_key_unknown,
             "known_hosts file " + opt.known_hosts_file + " does not exist, so host " + where +
                 " cannot be verified (" + presented +
                 "). Verify the fingerprint with the site and "
                 "write the host's key to " +
                 opt.known_hosts_file + ". Refusing to connect.",
             true);
        return false;
      case SSH_KNOWN_HOSTS_ERROR:
      default:
        fail(SshError::host_key_error,
             "cannot check host " + where + " against " + opt.known_hosts_file + ": " +
                 session_error() + " (" + presented + "). Fix the file. Refusing to connect.",
             true);
        return false;
    }
  }

  void on_ready() {
    connect_timer.cancel();
    ssh_event ev = ssh_event_new();
    if (ev == nullptr || ssh_event_add_session(ev, session.get()) != SSH_OK) {
      if (ev) ssh_event_free(ev);
      fail(SshError::connect_failed, "libssh could not create its event context", false);
      return;
    }
    event.reset(ev);
    phase = Phase::ready;
    if (ever_connected) ++totals.reconnects;
    ++totals.connects;
    const int attempts = attempt;
    attempt = 0;
    ever_connected = true;
    eager = false;
    last_err.clear();
    last_rx = Clock::now();
    last_rx_bytes = sock_ctr.in_bytes;
    open_check_packets = ~uint64_t{0};
    spdlog::info("ssh {}: connected after {} attempt(s){}", label, attempts,
                 opt.ciphers.empty() ? "" : " (ciphers " + opt.ciphers + ")");
    set_state(State::connected, "");
    schedule_keepalive(gen);
    service();
  }

  // ------------------------------------------------------------------------- failures
  // A connection attempt failed or a live connection died. Permanent failures stop for good.
  void fail(SshError kind, const std::string& reason, bool permanent) {
    const bool was_ready = phase == Phase::ready;
    const bool had_channels = !channels.empty();
    teardown(make_error_code(SshError::connection_lost));
    last_err = reason;
    if (was_ready) {
      spdlog::warn("ssh {}: connection lost: {} ({} channel(s) failed)", label, reason,
                   had_channels ? "open" : "no");
      eager = eager || had_channels;
    } else {
      spdlog::warn("ssh {}: attempt {} failed: {}", label, attempt, reason);
    }
    if (shut) return;
    if (permanent) {
      spdlog::error("ssh {}: giving up (permanent error): {}", label, reason);
      failure = kind;
      set_state(State::failed, reason);
      fail_waiting(make_error_code(kind), reason);
      return;
    }
    if (waiting.empty() && !eager) {
      attempt = 0;
      set_state(State::idle, reason);
      return;
    }
    const auto cap = backoff.base(attempt - 1);
    const auto delay = backoff.delay(attempt - 1);
    spdlog::info("ssh {}: reconnect attempt {} in {} ms (backoff cap {} ms): {}", label,
                 attempt + 1, delay.count(), static_cast<int64_t>(cap.count()), reason);
    set_state(State::reconnecting, reason);
    backoff_timer.expires_after(delay);
    backoff_timer.async_wait([self = shared_from_this(), g = gen](error_code ec) {
      if (ec || g != self->gen || self->shut) return;
      self->start_attempt();
    });
  }

  // Drops the session. Channels and their pending operations fail with `why`; requests that
  // were being opened go back to the waiting queue (they are re-sent after reconnecting).
  void teardown(error_code why) {
    ++gen;
    phase = Phase::down;
    read_armed = write_armed = false;
    connect_timer.cancel();
    keepalive_timer.cancel();
    resolver.cancel();

    // libssh keeps raw pointers to our callbacks: detach every channel before freeing any.
    for (auto& req : opening) {
      if (req->state && req->state->channel) {
        ssh_remove_channel_callbacks(req->state->channel.get(), &req->state->callbacks);
      }
    }
    for (auto& [id, cs] : channels) {
      if (cs->channel) ssh_remove_channel_callbacks(cs->channel.get(), &cs->callbacks);
    }
    for (auto it = opening.rbegin(); it != opening.rend(); ++it) {
      (*it)->state.reset();  // frees the half-open ssh_channel
      waiting.push_front(*it);
    }
    opening.clear();
    for (auto& [id, cs] : channels) {
      cs->channel.reset();
      cs->gone = why;
      if (cs->reading) cs->complete_read(why, 0);
      if (cs->writing) cs->complete_write(why, 0);
    }
    totals.channels_open = 0;
    channels.clear();

    if (event && session) ssh_event_remove_session(event.get(), session.get());
    event.reset();
    if (session) {
      // ssh_disconnect sends SSH_MSG_DISCONNECT (best effort) and forgets the fd without closing
      // it (it came from SSH_OPTIONS_FD); we close our dup ourselves, exactly once.
      const int fd = connect_called ? ssh_get_fd(session.get()) : libssh_fd;
      if (connect_called) ssh_disconnect(session.get());
      if (fd >= 0) ::close(fd);
      session.reset();
    } else if (libssh_fd >= 0) {
      ::close(libssh_fd);
    }
    libssh_fd = -1;
    connect_called = false;
    totals.bytes_in += sock_ctr.in_bytes;
    totals.bytes_out += sock_ctr.out_bytes;
    sock_ctr = {};
    raw_ctr = {};
    error_code ignored;
    socket.close(ignored);
  }

  void fail_waiting(error_code ec, const std::string& message) {
    auto reqs = std::move(waiting);
    waiting.clear();
    for (auto& req : reqs) {
      if (req->timer) req->timer->cancel();
      asio::post(ioc, [h = std::move(req->handler), ec, message] { h(ec, message, nullptr); });
    }
  }

  void shutdown() {
    if (shut) return;
    shut = true;
    spdlog::info("ssh {}: shutting down", label);
    backoff_timer.cancel();
    teardown(asio::error::operation_aborted);
    fail_waiting(asio::error::operation_aborted, "SSH connection to " + label + " was shut down");
    if (st != State::failed) set_state(State::idle, "shut down");
  }

  // --------------------------------------------------------------------- socket waits
  bool socket_ready_now() {
    if (!session || !socket.is_open()) return false;
    short want = POLLIN;
    if (ssh_get_poll_flags(session.get()) & SSH_WRITE_PENDING) want |= POLLOUT;
    return (poll_now(socket.native_handle(), want) & (want | POLLERR | POLLHUP)) != 0;
  }

  // Called when a step returned SSH_AGAIN and the socket cannot make progress right now.
  void arm_waits(uint64_t g) {
    if (g != gen || !socket.is_open()) return;
    if (!read_armed) {
      read_armed = true;
      socket.async_wait(tcp::socket::wait_read, [self = shared_from_this(), g](error_code ec) {
        if (g != self->gen) return;
        self->read_armed = false;
        self->on_socket_event(ec);
      });
    }
    if (!write_armed && session && (ssh_get_poll_flags(session.get()) & SSH_WRITE_PENDING)) {
      write_armed = true;
      socket.async_wait(tcp::socket::wait_write, [self = shared_from_this(), g](error_code ec) {
        if (g != self->gen) return;
        self->write_armed = false;
        self->on_socket_event(ec);
      });
    }
  }

  void on_socket_event(error_code ec) {
    if (ec == asio::error::operation_aborted) return;
    if (ec) {
      fail(phase == Phase::ready ? SshError::connection_lost : SshError::connect_failed,
           "socket error: " + ec.message(), false);
      return;
    }
    if (phase == Phase::ready) {
      service();
    } else if (phase == Phase::handshaking || phase == Phase::authenticating) {
      drive_handshake(gen);
    }
  }

  void request_service() {
    if (service_posted || phase != Phase::ready) return;
    service_posted = true;
    asio::post(ioc, [self = shared_from_this(), g = gen] {
      self->service_posted = false;
      if (g == self->gen && self->phase == Phase::ready) self->service();
    });
  }

  // ---------------------------------------------------------------- connected service
  // Reads and writes the socket through libssh, then moves channel work forward.
  void service() {
    const uint64_t g = gen;
    bool again = false;  // stopped by the pass limit with work possibly left
    Pump pumped = Pump::idle;
    for (int pass = 0; pass < 4; ++pass) {
      pumped = pump();
      const bool more = pumped == Pump::more;
      if (g != gen) return;
      if (dead()) {
        fail(SshError::connection_lost, "the SSH server closed the connection: " + session_error(),
             false);
        return;
      }
      if (sock_ctr.in_bytes != last_rx_bytes) {
        last_rx_bytes = sock_ctr.in_bytes;
        last_rx = Clock::now();
      }
      bool progress = service_opens();
      if (g != gen) return;
      progress = service_reads() || progress;
      progress = service_writes() || progress;
      if (g != gen) return;
      if (dead()) {
        fail(SshError::connection_lost, "the SSH server closed the connection: " + session_error(),
             false);
        return;
      }
      again = progress || more;
      if (!again) break;
    }
    // Asio's reactor is edge-triggered: if libssh left bytes in the socket (it reads 4 KiB per
    // round, also inside channel calls) or output it could write now, no edge will announce them.
    // Go round again through the queue instead of waiting for an event that will not come.
    if (again || (pumped != Pump::stuck && socket_ready_now())) request_service();
    arm_waits(g);
  }

  // Lets libssh read/write while the socket is ready. ssh_event_dopoll(…, 0) polls the socket
  // itself and reads at most 4 KiB per call, so the loop calls it directly (a poll of our own per
  // round doubled the system calls of a bulk transfer) and asks the kernel for quick ACKs once per
  // pump when anything arrived (see request_quick_ack).
  enum class Pump { idle, more, stuck };
  Pump pump() {
    const int fd = socket.native_handle();
    const uint64_t in_before = sock_ctr.in_bytes;
    Pump result = Pump::more;  // budget used up with the socket still ready
    for (int i = 0; i < kPumpBudget; ++i) {
      int rc = ssh_event_dopoll(event.get(), 0);
      if (rc == SSH_ERROR || dead()) {
        result = Pump::idle;
        break;
      }
      if (rc == SSH_AGAIN) {
        // Nothing libssh waits for is ready. If the socket is ready for something libssh ignores
        // right now, report it, so that the caller never spins on that readiness.
        result = socket_ready_now() ? Pump::stuck : Pump::idle;
        break;
      }
    }
    if (sock_ctr.in_bytes != in_before) request_quick_ack(fd);
    return result;
  }

  // Sends waiting open requests and collects sshd's answers to those in flight.
  bool service_opens() {
    bool progress = false;
    while (!waiting.empty()) {
      auto req = waiting.front();
      waiting.pop_front();
      if (req->timer) req->timer->cancel();
      auto cs = std::make_shared<ChannelState>();
      cs->id = req->id;
      cs->ioc = &ioc;
      cs->label = "ssh:" + label + "->" + req->host + ":" + std::to_string(req->port) + "#" +
                  std::to_string(req->id);
      ssh_channel ch = ssh_channel_new(session.get());
      if (ch == nullptr) {
        fail(SshError::connection_lost, "libssh could not create a channel: " + session_error(),
             false);
        return false;
      }
      cs->channel.reset(ch);
      ssh_callbacks_init(&cs->callbacks);
      cs->callbacks.userdata = cs.get();
      cs->callbacks.channel_data_function = on_channel_data;
      cs->callbacks.channel_eof_function = on_channel_eof;
      cs->callbacks.channel_close_function = on_channel_close;
      ssh_set_channel_callbacks(ch, &cs->callbacks);
      req->state = cs;
      opening.push_back(req);
      open_check_packets = ~uint64_t{0};  // force a look at the new request below
      progress = true;
    }
    // ssh_channel_open_forward polls once when the answer is not there yet; only ask again when
    // packets arrived since the last round.
    while (!opening.empty() && raw_ctr.in_packets != open_check_packets) {
      open_check_packets = raw_ctr.in_packets;
      const uint64_t g = gen;
      auto batch = opening;
      for (auto& req : batch) {
        if (g != gen) return progress;
        if (!req->state || !req->state->channel) continue;
        int rc = ssh_channel_open_forward(req->state->channel.get(), req->host.c_str(), req->port,
                                          "127.0.0.1", 0);
        if (rc == SSH_AGAIN) continue;
        if (dead()) return progress;  // service() fails the connection; requests are kept
        opening.erase(std::find(opening.begin(), opening.end(), req));
        progress = true;
        if (rc == SSH_OK) {
          finish_open(req);
        } else {
          refuse_open(req, session_error());
        }
      }
    }
    return progress;
  }

  void finish_open(const std::shared_ptr<OpenRequest>& req);

  void refuse_open(const std::shared_ptr<OpenRequest>& req, const std::string& libssh_error) {
    std::string why = libssh_error;
    // libssh: "Channel opening failure: channel N error (CODE) TEXT" (RFC 4254 reason codes).
    auto pos = libssh_error.find("error (");
    if (pos != std::string::npos) {
      int code = std::atoi(libssh_error.c_str() + pos + 7);
      auto close = libssh_error.find(')', pos);
      std::string text = close == std::string::npos ? "" : libssh_error.substr(close + 1);
      while (!text.empty() && text.front() == ' ') text.erase(0, 1);
      const char* names[] = {"", "administratively prohibited", "connect failed",
                             "unknown channel type", "resource shortage"};
      std::string name = code >= 1 && code <= 4 ? names[code] : "error " + std::to_string(code);
      why = name + (text.empty() ? "" : ": " + text);
    }
    std::string target = req->host + ":" + std::to_string(req->port);
    std::string message = "sshd on " + opt.host + ":" + std::to_string(opt.port) +
                          " refused to open a channel to " + target + " (" + why + "). ";
    if (why.rfind("administratively prohibited", 0) == 0) {
      message += "The login host does not allow forwarding to " + target +
                 " for this key (permitopen/AllowTcpForwarding): ask the site to allow it or "
                 "use an allowed address.";
    } else {
      message += "Check that something listens on " + target + " as seen from the login host.";
    }
    spdlog::warn("ssh {}: channel #{} to {} refused: {}", label, req->id, target, why);
    req->state.reset();
    asio::post(ioc, [h = std::move(req->handler), message] {
      h(make_error_code(SshError::channel_open_refused), message, nullptr);
    });
  }

  bool service_reads() {
    bool progress = false;
    for (auto& [id, cs] : channels) {
      if (!cs->reading || !cs->channel) continue;
      if (cs->buffered > 0) {
        const auto want =
            static_cast<uint32_t>(std::min<std::size_t>(cs->read_buffer.size(), kMaxReadChunk));
        int n = ssh_channel_read_nonblocking(cs->channel.get(), cs->read_buffer.data(), want, 0);
        if (n > 0) {
          cs->buffered -= std::min<uint32_t>(cs->buffered, static_cast<uint32_t>(n));
          cs->complete_read({}, static_cast<std::size_t>(n));
          progress = true;
          continue;
        }
        if (n == 0) {
          cs->buffered = 0;  // our count was stale; the data callback will deliver
        } else if (n == SSH_EOF) {
          cs->buffered = 0;
          cs->remote_eof = true;
        } else {
          if (dead()) return progress;
          cs->buffered = 0;
          cs->remote_eof = true;
        }
      }
      if (cs->reading && cs->buffered == 0 && cs->remote_eof) {
        cs->complete_read(asio::error::eof, 0);
        progress = true;
      }
    }
    return progress;
  }

  bool service_writes() {
    bool progress = false;
    for (auto& [id, cs] : channels) {
      if (!cs->writing || !cs->channel) continue;
      if (cs->remote_closed) {
        cs->complete_write(asio::error::broken_pipe, cs->write_total - cs->write_left);
        progress = true;
        continue;
      }
      while (cs->write_left > 0) {
        // Only hand libssh more when its output buffer has gone to the socket: bounds memory and
        // keeps one busy channel from queueing megabytes in front of the others.
        if (ssh_get_poll_flags(session.get()) & SSH_WRITE_PENDING) return progress;
        const uint32_t window = ssh_channel_window_size(cs->channel.get());
        if (window == 0) break;  // wait for the peer's WINDOW_ADJUST
        const auto chunk = static_cast<uint32_t>(std::min<std::size_t>(
            {cs->write_left, static_cast<std::size_t>(window), kMaxWriteChunk}));
        int n = ssh_channel_write(cs->channel.get(), cs->write_data, chunk);
        if (n < 0) {
          if (dead()) return progress;
          cs->complete_write(asio::error::broken_pipe, cs->write_total - cs->write_left);
          progress = true;
          break;
        }
        if (n == 0) break;
        cs->write_data += n;
        cs->write_left -= static_cast<std::size_t>(n);
        progress = true;
      }
      if (cs->writing && cs->write_left == 0) {
        cs->complete_write({}, cs->write_total);
        progress = true;
      }
    }
    return progress;
  }

  // ------------------------------------------------------------------------ keepalive
  void schedule_keepalive(uint64_t g) {
    const auto interval = opt.keepalive_interval;
    if (interval.count() <= 0) return;
    const auto idle = Clock::now() - last_rx;
    const auto periods = idle / interval;  // whole intervals of silence so far
    keepalive_timer.expires_at(last_rx + interval * (periods + 1));
    keepalive_timer.async_wait([self = shared_from_this(), g](error_code ec) {
      if (ec || g != self->gen || self->phase != Phase::ready) return;
      self->keepalive_tick();
    });
  }

  void keepalive_tick() {
    const uint64_t g = gen;
    service();  // count whatever arrived meanwhile before judging silence
    if (g != gen) return;
    const auto interval = opt.keepalive_interval;
    const auto idle = Clock::now() - last_rx;
    if (idle >= interval * std::max(1, opt.keepalive_count_max)) {
      fail(SshError::connection_lost,
           "no answer from the SSH server for " +
               ms_text(std::chrono::duration_cast<std::chrono::milliseconds>(idle)) + " (" +
               std::to_string(opt.keepalive_count_max) + " keepalive interval(s) of " +
               ms_text(interval) + ")",
           false);
      return;
    }
    if (idle >= interval) {
      const uint64_t before = raw_ctr.out_packets;
      ssh_send_keepalive(session.get());
      if (raw_ctr.out_packets == before) ssh_send_keepalive(session.get());
      spdlog::debug("ssh {}: keepalive sent after {} ms of silence", label,
                    std::chrono::duration_cast<std::chrono::milliseconds>(idle).count());
      service();
      if (g != gen) return;
    }
    schedule_keepalive(g);
  }

  // ------------------------------------------------------------------ channel transport
  void channel_read(const std::shared_ptr<ChannelState>& cs, asio::mutable_buffer b,
                    ByteTransport::Handler h) {
    auto done = [this, &h](error_code ec, std::size_t n) {
      asio::post(ioc, [h = std::move(h), ec, n] { h(ec, n); });
    };
    if (cs->closed_locally) return done(asio::error::operation_aborted, 0);
    if (cs->gone) return done(cs->gone, 0);
    if (cs->reading) return done(asio::error::in_progress, 0);
    if (b.size() == 0) return done({}, 0);
    cs->reading = true;
    cs->read_buffer = b;
    cs->read_handler = std::move(h);
    if (cs->buffered > 0 || cs->remote_eof) request_service();
  }

  void channel_write(const std::shared_ptr<ChannelState>& cs, asio::const_buffer b,
                     ByteTransport::Handler h) {
    auto done = [this, &h](error_code ec, std::size_t n) {
      asio::post(ioc, [h = std::move(h), ec, n] { h(ec, n); });
    };
    if (cs->closed_locally) return done(asio::error::operation_aborted, 0);
    if (cs->gone) return done(cs->gone, 0);
    if (cs->writing) return done(asio::error::in_progress, 0);
    if (cs->remote_closed) return done(asio::error::broken_pipe, 0);
    if (b.size() == 0) return done({}, 0);
    cs->writing = true;
    cs->write_data = static_cast<const uint8_t*>(b.data());
    cs->write_left = cs->write_total = b.size();
    cs->write_handler = std::move(h);
    request_service();
  }

  void channel_close(const std::shared_ptr<ChannelState>& cs) {
    if (cs->closed_locally) return;
    cs->closed_locally = true;
    if (cs->reading) cs->complete_read(asio::error::operation_aborted, 0);
    if (cs->writing) cs->complete_write(asio::error::operation_aborted, 0);
    if (cs->channel) {
      ssh_remove_channel_callbacks(cs->channel.get(), &cs->callbacks);
      cs->channel.reset();  // ssh_channel_free sends EOF + CLOSE (flushed by the next service)
      if (totals.channels_open > 0) --totals.channels_open;
      spdlog::debug("{}: closed", cs->label);
    }
    channels.erase(cs->id);
    request_service();
  }
};

// The transport handed out for each open channel.
namespace {
class SshChannelTransport final : public ByteTransport {
 public:
  SshChannelTransport(std::shared_ptr<SshConnection> conn,
                      std::shared_ptr<SshConnection::Core> core, std::shared_ptr<ChannelState> cs)
      : conn_(std::move(conn)), core_(std::move(core)), cs_(std::move(cs)) {}
  ~SshChannelTransport() override { close(); }

  void async_read_some(asio::mutable_buffer buffer, Handler handler) override {
    core_->channel_read(cs_, buffer, std::move(handler));
  }
  void async_write(asio::const_buffer buffer, Handler handler) override {
    core_->channel_write(cs_, buffer, std::move(handler));
  }
  void close() override { core_->channel_close(cs_); }
  std::string describe() const override { return cs_->label; }

 private:
  std::shared_ptr<SshConnection> conn_;  // keeps the connection alive while the channel exists
  std::shared_ptr<SshConnection::Core> core_;
  std::shared_ptr<ChannelState> cs_;
};
}  // namespace

void SshConnection::Core::finish_open(const std::shared_ptr<OpenRequest>& req) {
  auto cs = req->state;
  req->state.reset();
  auto conn = owner.lock();
  if (!conn) {
    // The SshConnection is being destroyed; nobody can use the channel.
    ssh_remove_channel_callbacks(cs->channel.get(), &cs->callbacks);
    cs->channel.reset();
    return;
  }
  channels[cs->id] = cs;
  ++totals.channels_opened;
  ++totals.channels_open;
  spdlog::debug("{}: open", cs->label);
  ByteTransportPtr transport = std::make_unique<SshChannelTransport>(conn, shared_from_this(), cs);
  asio::post(ioc, [h = std::move(req->handler), t = std::move(transport)]() mutable {
    h({}, std::string(), std::move(t));
  });
}

// ------------------------------------------------------------------------- SshConnection
std::shared_ptr<SshConnection> SshConnection::create(asio::io_context& ioc, SshOptions options) {
  ssh_init();  // reference-counted; libssh also initialises itself when loaded
  auto core = std::make_shared<Core>(ioc, std::move(options));
  std::shared_ptr<SshConnection> conn(new SshConnection(core));
  core->owner = conn;
  return conn;
}

SshConnection::SshConnection(std::shared_ptr<Core> core) : core_(std::move(core)) {}

SshConnection::~SshConnection() {
  core_->shutdown();
}

void SshConnection::async_open_channel(std::string host, uint16_t port, OpenHandler handler) {
  Core& c = *core_;
  if (c.shut) {
    asio::post(c.ioc, [h = std::move(handler), l = c.label] {
      h(asio::error::operation_aborted, "SSH connection to " + l + " was shut down", nullptr);
    });
    return;
  }
  if (c.st == State::failed) {
    // Same code as the original failure, so callers can tell it is permanent.
    asio::post(c.ioc, [h = std::move(handler), e = c.last_err, kind = c.failure] {
      h(make_error_code(kind), e, nullptr);
    });
    return;
  }
  auto req = std::make_shared<OpenRequest>();
  req->id = c.next_id++;
  req->host = std::move(host);
  req->port = port;
  req->handler = std::move(handler);
  if (c.opt.open_timeout.count() > 0) {
    req->timer = std::make_unique<asio::steady_timer>(c.ioc, c.opt.open_timeout);
    std::weak_ptr<OpenRequest> weak = req;
    req->timer->async_wait([core = core_, weak](error_code ec) {
      auto r = weak.lock();
      if (ec || !r) return;
      auto it = std::find(core->waiting.begin(), core->waiting.end(), r);
      if (it == core->waiting.end()) return;  // already sent to sshd: sshd or keepalive decides
      core->waiting.erase(it);
      std::string msg = "no SSH connection to " + core->label + " within " +
                        ms_text(core->opt.open_timeout) +
                        (core->last_err.empty() ? "" : ": " + core->last_err);
      asio::post(core->ioc, [h = std::move(r->handler), msg] {
        h(make_error_code(SshError::open_timeout), msg, nullptr);
      });
    });
  }
  c.waiting.push_back(std::move(req));
  if (c.phase == Core::Phase::ready) {
    c.request_service();
  } else {
    c.want_connection();
  }
}

void SshConnection::connect() {
  if (core_->st == State::idle) core_->want_connection();
}

void SshConnection::on_state_change(StateObserver observer) {
  core_->observers.push_back(std::move(observer));
}

SshConnection::State SshConnection::state() const {
  return core_->st;
}
std::string SshConnection::last_error() const {
  return core_->last_err;
}
const SshOptions& SshConnection::options() const {
  return core_->opt;
}
std::string SshConnection::describe() const {
  return core_->label;
}

SshCounters SshConnection::counters() const {
  SshCounters c = core_->totals;
  c.bytes_in += core_->sock_ctr.in_bytes;
  c.bytes_out += core_->sock_ctr.out_bytes;
  return c;
}

void SshConnection::shutdown() {
  core_->shutdown();
}
bool SshConnection::is_shut_down() const {
  return core_->shut;
}

// ----------------------------------------------------------------------- SshConnectionPool
std::shared_ptr<SshConnection> SshConnectionPool::get(const SshOptions& options) {
  const std::string key = options.user + "@" + options.host + ":" + std::to_string(options.port);
  auto it = connections_.find(key);
  if (it != connections_.end()) {
    if (it->second->state() != SshConnection::State::failed && !it->second->is_shut_down()) {
      const SshOptions& have = it->second->options();
      if (have.identity_file != options.identity_file ||
          have.known_hosts_file != options.known_hosts_file || have.ciphers != options.ciphers) {
        spdlog::warn(
            "ssh {}: already connected with identity {}, known_hosts {}; ignoring the "
            "different settings of this caller",
            key, have.identity_file, have.known_hosts_file);
      }
      return it->second;
    }
    spdlog::info("ssh {}: replacing the {} connection ({})", key,
                 it->second->is_shut_down() ? "shut down" : "failed", it->second->last_error());
    it->second->shutdown();
    connections_.erase(it);
  }
  auto conn = SshConnection::create(ioc_, options);
  connections_.emplace(key, conn);
  return conn;
}

void SshConnectionPool::shutdown_all() {
  for (auto& [key, conn] : connections_) conn->shutdown();
  connections_.clear();
}

bool is_permanent_ssh_error(const boost::system::error_code& ec) {
  if (ec.category() != ssh_category()) return false;
  switch (static_cast<SshError>(ec.value())) {
    case SshError::host_key_unknown:
    case SshError::host_key_changed:
    case SshError::host_key_error:
    case SshError::auth_denied:
    case SshError::identity_unreadable:
      return true;
    default:
      return false;
  }
}

}  // namespace kb::tunnel
