#pragma once
// LinkSession: one end (bridge or agent) of the link that carries one kernel's channels over a
// ByteTransport: framed streams with per-stream credit, priority scheduling (hb/control/shell/stdin
// before iopub), sequence numbers + cumulative acks + a bounded replay buffer so that a replaced
// transport resumes with no byte lost or duplicated, mutual challenge-response authentication with
// the per-kernel LinkSecret. Wire format: docs/protocol.md.
// Thread model: every public member (and every handler it calls) runs on the io_context's single
// thread; create it, call it and destroy it only from that thread.
#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "auth/secret.hpp"
#include "common/clock.hpp"
#include "link/transport.hpp"

namespace kb::tunnel {

// The five Jupyter channels. The numeric values are on the wire (OPEN frame).
enum class ChannelKind : std::uint8_t { shell = 0, iopub = 1, stdin_ = 2, control = 3, hb = 4 };
inline constexpr std::size_t kChannelKinds = 5;
// Every kind, in wire order (also the index order of per-channel arrays).
inline constexpr std::array<ChannelKind, kChannelKinds> kAllChannelKinds{
    ChannelKind::shell, ChannelKind::iopub, ChannelKind::stdin_, ChannelKind::control,
    ChannelKind::hb};
// "shell", "iopub", "stdin", "control", "hb": the one spelling, in logs, events and metrics.
const char* to_string(ChannelKind kind);

// connecting: no transport authenticated yet; up: a transport is live; down: the transport was
// lost, local sockets stay open and the session waits for attach_transport (resume); closed: final.
enum class LinkState { connecting, up, down, closed };
const char* to_string(LinkState state);

class LinkSessionImpl;

// What a bridge-side session hands to the process that replaces it (a planned restart,
// docs/state.md): its identity and sequence state and every open stream with its local socket's
// descriptor, so the new process resumes the same session with the agent and every Jupyter client
// connection goes on as if nothing happened. Taken only once the session is quiet: nothing is
// waiting to be written to a local socket and the agent has acknowledged everything sent to it.
struct LinkHandover {
  struct Stream {
    std::uint32_t id = 0;
    ChannelKind kind = ChannelKind::shell;
    std::uint64_t credit = 0;            // bytes this side may still send on it
    std::uint64_t credit_to_return = 0;  // written to the socket, not yet credited back
    bool read_eof = false, peer_fin = false, shut_down = false;
    int fd = -1;  // the local socket (owned by the holder of this object)
  };
  std::string self_id, peer_id;  // 32 hex digits each
  std::uint32_t peer_window = 0;
  std::uint64_t next_seq = 1;       // the seq this side's next frame gets
  std::uint64_t last_received = 0;  // the peer's frames up to here were delivered
  std::uint32_t next_stream_id = 1;
  std::vector<Stream> streams;
};

class LinkSession : public std::enable_shared_from_this<LinkSession> {
 public:
  enum class Role { bridge, agent };

  struct Options {
    // Per-stream receive window this side advertises: the peer keeps at most this many bytes of
    // one stream in flight toward us (credit is returned as bytes are written to the local socket).
    std::size_t stream_window = 256 * 1024;
    // Bytes of sent-but-unacknowledged frames kept for retransmission. When full, this side stops
    // reading its local sockets (backpressure); nothing is dropped.
    std::size_t replay_limit = 8 * 1024 * 1024;
    // Largest DATA payload (<= 65536). Smaller chunks let hb/control overtake a flooding iopub
    // sooner.
    std::size_t max_chunk = 64 * 1024;
    // Streams this session accepts at once (bridge: local connections; agent: OPEN requests).
    std::size_t max_streams = 1024;
    // A candidate transport must complete the handshake within this time, or it is closed.
    std::chrono::milliseconds handshake_timeout{10000};
    // A live transport with no ack progress on outstanding frames, or with nothing at all received,
    // for this long is treated as dead (closed; the owner attaches a new one). Pings keep an idle
    // link alive (sent after liveness_timeout / 3 of silence).
    std::chrono::milliseconds liveness_timeout{30000};
    // Acks are coalesced: sent at the latest this long after the first unacknowledged frame (or at
    // once when a quarter of the replay limit is unacknowledged).
    std::chrono::milliseconds ack_delay{5};
    std::string log_id;  // kernel id for logs
    // Time for the handshake, goodbye, ack and liveness timers; must outlive the session. Null:
    // real time on the io_context. Tests may pass a kb::ManualClock.
    kb::Clock* clock = nullptr;
  };

  struct Handlers {
    // Reliable, in-order control messages (JSON objects) from the peer.
    std::function<void(const nlohmann::json&)> on_control;
    // Every state change, with a reason a person can act on (for down/closed).
    std::function<void(LinkState, const std::string& reason)> on_state;
    // Agent side only: the bridge opened stream `id` of `kind`; answer with attach_stream or
    // refuse_stream (possibly later, e.g. once the kernel listens). Data for it is held meanwhile
    // (bounded by the stream window). Without this handler every stream is refused.
    std::function<void(std::uint32_t id, ChannelKind kind)> on_stream_request;
    // A candidate transport was refused or lost before it became live (wrong secret, timeout,
    // version mismatch, cut during the handshake). The live transport, if any, is unaffected; a
    // bridge owner typically schedules another attempt (with backoff).
    std::function<void(const std::string& reason)> on_candidate_failed;
  };

  struct Stats {
    std::uint64_t bytes_in = 0, bytes_out = 0;    // link bytes (all frames) received / written
    std::uint64_t frames_in = 0, frames_out = 0;  // frames received / written (incl. retransmits)
    std::uint64_t resumes = 0;                    // successful handshakes after the first
    std::uint64_t retransmitted_bytes = 0;        // frame bytes written again after a resume
    std::uint64_t auth_failures = 0;              // candidate transports refused
    std::size_t streams = 0;                      // open streams now
    std::uint64_t streams_opened = 0;             // streams ever opened in this session
    std::size_t replay_bytes = 0;                 // bytes in the replay buffer now
    // Stream payload bytes by ChannelKind: sent to the peer / received from the peer.
    std::array<std::uint64_t, kChannelKinds> stream_bytes_out{};
    std::array<std::uint64_t, kChannelKinds> stream_bytes_in{};
  };

  // The session does nothing until a transport is attached. The bridge role initiates the
  // handshake on every attached transport; the agent role answers.
  static std::shared_ptr<LinkSession> create(boost::asio::io_context& io, Role role,
                                             kb::auth::LinkSecret secret, Options options,
                                             Handlers handlers);
  // Bridge side: the session a previous process handed over (LinkSession::quiesce there). It
  // starts down, with its streams reading their sockets again; the next attach_transport resumes
  // the same session with the agent, which retransmits what the previous process did not take.
  // The descriptors in `handover` are owned by the session from here on (closed on failure).
  static std::shared_ptr<LinkSession> resume_handed_over(boost::asio::io_context& io,
                                                         kb::auth::LinkSecret secret,
                                                         Options options, Handlers handlers,
                                                         const LinkHandover& handover);
  ~LinkSession();
  LinkSession(const LinkSession&) = delete;
  LinkSession& operator=(const LinkSession&) = delete;

  // Bridge side: adopt an accepted local client connection as a new stream of `kind`. Works while
  // the link is not up yet (the socket is read once the link is up; until then its bytes wait in
  // the kernel's socket buffer). Returns the stream id, or 0 if refused (closed session, too many
  // streams, wrong role) — the socket is then closed.
  std::uint32_t add_local_stream(ChannelKind kind, boost::asio::ip::tcp::socket socket);
  // Agent side: answers to on_stream_request. Unknown or already answered ids are ignored (logged).
  void attach_stream(std::uint32_t id, boost::asio::ip::tcp::socket socket);
  void refuse_stream(std::uint32_t id, const std::string& reason);

  // Either side: a candidate transport. The session authenticates it (mutual challenge-response);
  // only when that succeeds does it replace the current transport (a failed knock never disturbs
  // a working link), then both sides resume (retransmit what the peer has not acknowledged).
  void attach_transport(ByteTransportPtr transport);

  // Reliable, ordered, survives reconnects. Refused (logged, returns false) when the session is
  // closed or the serialized message exceeds the control frame limit (256 KiB).
  bool send_control(const nlohmann::json& message);

  // Close every stream, tell the peer (best effort, GOODBYE with `reason`), state -> closed.
  void close(const std::string& reason);

  // Bridge side, for a planned restart: stop reading the local sockets and stop taking the peer's
  // frames (it keeps them for the resume), finish writing what was taken, and wait until the peer
  // has acknowledged everything sent. Then `done` gets the handover (the descriptors are
  // duplicates the caller owns) and the session is closed without a word to the peer, which waits
  // for the resume. If it cannot get quiet within `timeout` (e.g. the link is down with frames
  // unacknowledged), `done` gets nothing and a reason; the session stays usable for close().
  void quiesce(std::chrono::milliseconds timeout,
               std::function<void(std::optional<LinkHandover>, const std::string& why_not)> done);

  LinkState state() const;
  Stats stats() const;
  // Random identity of this session (16 bytes, hex); a restarted peer shows up with a new one.
  std::string session_id() const;

 private:
  LinkSession() = default;
  std::shared_ptr<LinkSessionImpl> impl_;
};

}  // namespace kb::tunnel
