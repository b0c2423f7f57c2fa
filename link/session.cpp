#include "link/session.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <deque>
#include <optional>
#include <stdexcept>
#include <unordered_map>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/clock.hpp"
#include "link/frame.hpp"
#include "link/handshake.hpp"
#include "link/replay.hpp"
#include "link/tcp_transport.hpp"

namespace kb::tunnel {

namespace asio = boost::asio;
using asio::ip::tcp;
using frame::FrameType;
using Clock = kb::Clock;

const char* to_string(ChannelKind kind) {
  switch (kind) {
    case ChannelKind::shell:
      return "shell";
    case ChannelKind::iopub:
      return "iopub";
    case ChannelKind::stdin_:
      return "stdin";
    case ChannelKind::control:
      return "control";
    case ChannelKind::hb:
      return "hb";
  }
  return "unknown";
}

const char* to_string(LinkState state) {
  switch (state) {
    case LinkState::connecting:
      return "connecting";
    case LinkState::up:
      return "up";
    case LinkState::down:
      return "down";
    case LinkState::closed:
      return "closed";
  }
  return "unknown";
}

namespace {

// Scheduling classes: hb first, then control, shell, stdin; iopub (bulk) last.
std::size_t priority_class(ChannelKind kind) {
  switch (kind) {
    case ChannelKind::hb:
      return 0;
    case ChannelKind::control:
      return 1;
    case ChannelKind::shell:
      return 2;
    case ChannelKind::stdin_:
      return 3;
    case ChannelKind::iopub:
      return 4;
  }
  return 4;
}

std::string hex_id(const SessionId& id) {
  return kb::auth::to_hex(id);
}

bool is_zero(const SessionId& id) {
  return std::all_of(id.begin(), id.end(), [](std::uint8_t b) { return b == 0; });
}

std::span<const std::uint8_t> text_bytes(const std::string& s, std::size_t max) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), std::min(s.size(), max)};
}

std::string payload_text(std::span<const std::uint8_t> p) {
  std::string s(reinterpret_cast<const char*>(p.data()), p.size());
  // Keep logs one line and printable whatever the peer sent.
  for (auto& c : s) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return s;
}

}  // namespace

struct LinkStream {
  LinkStream(std::uint32_t id_, ChannelKind kind_) : id(id_), kind(kind_) {}
  std::uint32_t id;
  ChannelKind kind;
  std::optional<tcp::socket> socket;  // agent: empty until attach_stream
  bool answered = false;              // agent: attach_stream/refuse_stream called
  // Local socket -> peer.
  std::uint64_t credit = 0;  // bytes we may still send (the peer's window minus bytes in flight)
  bool queued = false;       // in a ready queue
  bool armed = false;        // async_wait(read) outstanding
  bool read_eof = false;     // local EOF read, FIN queued
  // Peer -> local socket.
  std::vector<std::uint8_t> pending;  // received, not yet handed to the socket
  std::vector<std::uint8_t> writing;  // handed to the socket (async_write in flight)
  bool write_in_flight = false;
  std::uint64_t unreturned = 0;        // received and not yet credited back
  std::uint64_t credit_to_return = 0;  // written to the socket, not yet credited back
  bool peer_fin = false;
  bool shut_down = false;  // shutdown(send) done after peer FIN
  bool closed = false;
};
using StreamPtr = std::shared_ptr<LinkStream>;

struct TransportSlot {
  TransportSlot(kb::Clock& clock, ByteTransportPtr t) : transport(std::move(t)), timer(clock) {
    name = transport->describe();
  }
  enum class Phase { handshaking, resuming, live, dead };
  ByteTransportPtr transport;
  std::string name;
  frame::FrameDecoder decoder;
  std::unique_ptr<LinkHandshake> handshake;
  LinkHandshake::Result peer;  // valid from authentication on
  Phase phase = Phase::handshaking;
  bool sent_resume = false;
  std::vector<std::uint8_t> out;      // link-level frames waiting to be written
  std::vector<std::uint8_t> writing;  // link-level frames in flight
  ReplayBuffer::Chunk chunk;          // replayed frames in flight
  bool write_in_flight = false;
  bool close_after_write = false;
  kb::ClockTimer timer;  // handshake timeout, then goodbye timeout
};
using SlotPtr = std::shared_ptr<TransportSlot>;

class LinkSessionImpl : public std::enable_shared_from_this<LinkSessionImpl> {
 public:
  LinkSessionImpl(asio::io_context& io, LinkSession::Role role, kb::auth::LinkSecret secret,
                  LinkSession::Options options, LinkSession::Handlers handlers)
      : io_(io),
        role_(role),
        secret_(std::move(secret)),
        opts_(std::move(options)),
        handlers_(std::move(handlers)),
        replay_(std::max<std::size_t>(64 * 1024, 4 * (opts_.max_chunk + frame::kHeaderSize))),
        real_clock_(opts_.clock ? nullptr : std::make_unique<kb::AsioClock>(io)),
        clock_(opts_.clock ? *opts_.clock : *real_clock_),
        ack_timer_(clock_),
        tick_timer_(clock_),
        quiet_timer_(clock_) {
    opts_.max_chunk = std::clamp<std::size_t>(opts_.max_chunk, 1, frame::kMaxDataPayload);
    opts_.stream_window = std::clamp<std::size_t>(opts_.stream_window, 1024, 1u << 30);
    opts_.replay_limit = std::max<std::size_t>(opts_.replay_limit, 2 * opts_.max_chunk);
    auto id = kb::auth::random_bytes(self_id_.size());
    std::copy(id.begin(), id.end(), self_id_.begin());
    unsent_target_ = std::max<std::size_t>(64 * 1024, 2 * (opts_.max_chunk + frame::kHeaderSize));
    ack_threshold_ = std::clamp<std::size_t>(opts_.replay_limit / 4, 1024, 256 * 1024);
    log_ = "link[" + (opts_.log_id.empty() ? std::string("-") : opts_.log_id) + "/" +
           (role_ == LinkSession::Role::bridge ? "bridge" : "agent") + "]";
  }

  void start() { schedule_tick(); }

  // ---- public API ---------------------------------------------------------------------------

  std::uint32_t add_local_stream(ChannelKind kind, tcp::socket socket) {
    boost::system::error_code ec;
    if (role_ != LinkSession::Role::bridge) {
      spdlog::error("{} add_local_stream called on the agent side; refusing the connection", log_);
      socket.close(ec);
      return 0;
    }
    if (state_ == LinkState::closed) {
      spdlog::warn("{} {} connection refused: link closed ({})", log_, to_string(kind),
                   closed_reason_);
      socket.close(ec);
      return 0;
    }
    if (streams_.size() >= opts_.max_streams) {
      spdlog::warn("{} {} connection refused: {} streams open (max_streams)", log_, to_string(kind),
                   streams_.size());
      socket.close(ec);
      return 0;
    }
    const std::uint32_t id = next_stream_id_++;
    auto s = std::make_shared<LinkStream>(id, kind);
    prepare_socket(socket);
    s->socket.emplace(std::move(socket));
    s->answered = true;
    if (peer_window_ > 0) s->credit = peer_window_;
    streams_.emplace(id, s);
    ++stats_.streams_opened;
    const std::uint8_t k = static_cast<std::uint8_t>(kind);
    append_sequenced(FrameType::open, id, {&k, 1});
    spdlog::debug("{} stream {} ({}) opened", log_, id, to_string(kind));
    make_ready(*s);
    pump();
    return id;
  }

  void attach_stream(std::uint32_t id, tcp::socket socket) {
    boost::system::error_code ec;
    auto it = streams_.find(id);
    if (role_ != LinkSession::Role::agent || it == streams_.end() || it->second->answered) {
      spdlog::warn("{} attach_stream({}): no such pending stream (closed meanwhile?)", log_, id);
      socket.close(ec);
      return;
    }
    auto& s = *it->second;
    prepare_socket(socket);
    s.socket.emplace(std::move(socket));
    s.answered = true;
    spdlog::debug("{} stream {} ({}) attached", log_, id, to_string(s.kind));
    StreamPtr sp = it->second;
    start_write(sp);
    maybe_finish(sp);  // a FIN may have arrived before the kernel connection did
    if (sp->closed) return;
    make_ready(*sp);
    pump();
  }

  void refuse_stream(std::uint32_t id, const std::string& reason) {
    auto it = streams_.find(id);
    if (role_ != LinkSession::Role::agent || it == streams_.end() || it->second->answered) {
      spdlog::warn("{} refuse_stream({}): no such pending stream", log_, id);
      return;
    }
    spdlog::info("{} stream {} ({}) refused: {}", log_, id, to_string(it->second->kind), reason);
    reset_stream(it->second, reason);
    pump();
  }

  void attach_transport(ByteTransportPtr transport) {
    if (!transport) return;
    if (state_ == LinkState::closed) {
      spdlog::warn("{} transport {} ignored: link closed", log_, transport->describe());
      transport->close();
      return;
    }
    if (candidates_.size() >= kMaxCandidates) {
      spdlog::warn("{} transport {} refused: {} handshakes already in progress", log_,
                   transport->describe(), candidates_.size());
      transport->close();
      return;
    }
    auto slot = std::make_shared<TransportSlot>(clock_, std::move(transport));
    const auto nonce = kb::auth::random_bytes(frame::kNonceSize);
    slot->handshake = std::make_unique<LinkHandshake>(
        role_ == LinkSession::Role::bridge ? LinkHandshake::Role::bridge
                                           : LinkHandshake::Role::agent,
        secret_.bytes, self_id_, peer_id_, static_cast<std::uint32_t>(opts_.stream_window), nonce);
    candidates_.push_back(slot);
    spdlog::info("{} authenticating transport {}", log_, slot->name);
    slot->timer.wait(opts_.handshake_timeout, [weak = weak_from_this(), slot] {
      auto self = weak.lock();
      if (!self) return;
      if (slot->phase == TransportSlot::Phase::handshaking ||
          slot->phase == TransportSlot::Phase::resuming) {
        self->candidate_failed(slot,
                               "handshake timed out after " +
                                   std::to_string(self->opts_.handshake_timeout.count()) + " ms",
                               false);
      }
    });
    slot->handshake->start(slot->out);
    start_read(slot);
    write_next(slot);
  }

  bool send_control(const nlohmann::json& message) {
    if (state_ == LinkState::closed) {
      spdlog::warn("{} control message not sent: link closed", log_);
      return false;
    }
    const std::string text = message.dump();
    if (text.size() > frame::kMaxControlPayload) {
      spdlog::error("{} control message of {} bytes exceeds the {} byte limit; not sent", log_,
                    text.size(), frame::kMaxControlPayload);
      return false;
    }
    append_sequenced(FrameType::control, 0, text_bytes(text, text.size()));
    pump();
    return true;
  }

  void close(const std::string& reason) {
    if (state_ == LinkState::closed) return;
    spdlog::info("{} closing: {}", log_, reason);
    if (current_ && current_->phase == TransportSlot::Phase::live) {
      send_goodbye(current_, reason);
    } else if (current_) {
      retire(current_);
    }
    current_.reset();
    enter_closed(reason, false);
  }

  // Destruction without telling the owner (its handlers may be gone).
  void shutdown_quietly() {
    if (state_ != LinkState::closed) {
      if (current_) retire(current_);
      current_.reset();
      enter_closed("session destroyed", true);
    }
  }

  // ---- handover (planned restart) -------------------------------------------------------------

  void quiesce(std::chrono::milliseconds timeout,
               std::function<void(std::optional<LinkHandover>, const std::string&)> done) {
    if (role_ != LinkSession::Role::bridge || state_ == LinkState::closed || quiesce_done_) {
      done(std::nullopt, state_ == LinkState::closed ? "the link is closed: " + closed_reason_
                                                     : std::string("not a bridge-side session"));
      return;
    }
    spdlog::info("{} quiescing for a handover (replay {} bytes, {} streams)", log_, replay_.bytes(),
                 streams_.size());
    draining_ = true;
    for (auto& q : ready_) q.clear();
    for (auto& [id, st] : streams_) st->queued = false;
    quiesce_done_ = std::move(done);
    quiesce_deadline_ = clock_.now() + timeout;
    check_quiet();
  }

  // Throws std::invalid_argument for a handover that cannot be this side's (bad identities).
  void adopt(const LinkHandover& h) {
    SessionId self{}, peer{};
    kb::auth::Bytes bytes;
    if (!kb::auth::from_hex(h.self_id, bytes) || bytes.size() != self.size())
      throw std::invalid_argument("handover: bad session id");
    std::copy(bytes.begin(), bytes.end(), self.begin());
    kb::auth::Bytes peer_bytes;
    if (!kb::auth::from_hex(h.peer_id, peer_bytes) || peer_bytes.size() != peer.size())
      throw std::invalid_argument("handover: bad peer session id");
    std::copy(peer_bytes.begin(), peer_bytes.end(), peer.begin());
    if (is_zero(peer)) throw std::invalid_argument("handover: no peer session id");
    if (h.peer_window == 0 || h.next_seq == 0)
      throw std::invalid_argument("handover: no window or sequence");
    self_id_ = self;
    peer_id_ = peer;
    peer_window_ = h.peer_window;
    ever_up_ = true;
    state_ = LinkState::down;
    replay_.continue_at(h.next_seq);
    high_water_seq_ = h.next_seq - 1;
    last_received_ = acked_sent_ = h.last_received;
    next_stream_id_ = h.next_stream_id;
    for (const auto& hs : h.streams) {
      auto st = std::make_shared<LinkStream>(hs.id, hs.kind);
      st->answered = true;
      st->credit = std::min<std::uint64_t>(hs.credit, peer_window_);
      st->credit_to_return = hs.credit_to_return;
      st->read_eof = hs.read_eof;
      st->peer_fin = hs.peer_fin;
      st->shut_down = hs.shut_down;
      streams_.emplace(hs.id, st);
      ++stats_.streams_opened;
      sockaddr_storage addr{};
      socklen_t len = sizeof(addr);
      boost::system::error_code ec;
      tcp::socket socket(io_);
      if (hs.fd < 0 || ::getsockname(hs.fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
          (addr.ss_family != AF_INET && addr.ss_family != AF_INET6)) {
        ec = asio::error::bad_descriptor;
      } else {
        socket.assign(addr.ss_family == AF_INET ? tcp::v4() : tcp::v6(), hs.fd, ec);
      }
      if (ec) {
        if (hs.fd >= 0) ::close(hs.fd);
        // The agent closes its end on the resume.
        reset_stream(st, "the handed-over connection is unusable: " + ec.message());
        continue;
      }
      prepare_socket(socket);
      st->socket.emplace(std::move(socket));
      make_ready(*st);
      maybe_finish(st);
    }
    spdlog::info(
        "{} session {} taken over from the previous process: {} streams, next frame {}, "
        "delivered up to {}; resuming with the agent",
        log_, hex_id(self_id_), streams_.size(), h.next_seq, h.last_received);
    pump();
  }

  LinkState state() const { return state_; }

  LinkSession::Stats stats() const {
    auto s = stats_;
    s.streams = streams_.size();
    s.replay_bytes = replay_.bytes();
    return s;
  }

  std::string session_id() const { return hex_id(self_id_); }

 private:
  static constexpr std::size_t kMaxCandidates = 8;

  // Quiet means: nothing waiting for or being written to a local socket, and nothing of ours
  // unacknowledged (credit returned by those writes included).
  void check_quiet() {
    if (!quiesce_done_) return;
    bool writing = false;
    for (const auto& [id, st] : streams_) {
      if (st->write_in_flight || !st->pending.empty()) writing = true;
    }
    if (!writing && replay_.bytes() == 0) {
      finish_quiesce();
      return;
    }
    if (state_ == LinkState::closed || clock_.now() >= quiesce_deadline_) {
      auto done = std::move(quiesce_done_);
      quiesce_done_ = nullptr;
      const std::string why = state_ == LinkState::closed
                                  ? "the link closed: " + closed_reason_
                                  : std::string("not quiet in time: ") +
                                        std::to_string(replay_.bytes()) +
                                        " bytes unacknowledged by the agent" +
                                        (writing ? ", writes to local sockets pending" : "") +
                                        " (link " + to_string(state_) + ")";
      spdlog::warn("{} handover not possible: {}", log_, why);
      done(std::nullopt, why);
      return;
    }
    quiet_timer_.wait(std::chrono::milliseconds(5), [weak = weak_from_this()] {
      if (auto self = weak.lock()) self->check_quiet();
    });
  }

  void finish_quiesce() {
    auto done = std::move(quiesce_done_);
    quiesce_done_ = nullptr;
    LinkHandover h;
    h.self_id = hex_id(self_id_);
    h.peer_id = hex_id(peer_id_);
    h.peer_window = peer_window_;
    h.next_seq = replay_.next_seq();
    h.last_received = last_received_;
    h.next_stream_id = next_stream_id_;
    for (const auto& [id, st] : streams_) {
      if (st->closed || !st->socket) continue;
      const int fd = ::fcntl(st->socket->native_handle(), F_DUPFD_CLOEXEC, 3);
      if (fd < 0) {
        const std::string why =
            std::string("cannot duplicate a stream's socket: ") + std::strerror(errno);
        for (const auto& taken : h.streams) ::close(taken.fd);
        spdlog::warn("{} handover not possible: {}", log_, why);
        done(std::nullopt, why);
        return;
      }
      h.streams.push_back({st->id, st->kind, st->credit, st->credit_to_return, st->read_eof,
                           st->peer_fin, st->shut_down, fd});
    }
    std::sort(h.streams.begin(), h.streams.end(),
              [](const auto& a, const auto& b) { return a.id < b.id; });
    spdlog::info(
        "{} quiet: handing over session {} ({} streams, next frame {}, delivered up to "
        "{}); the agent keeps the session for the resume",
        log_, h.self_id, h.streams.size(), h.next_seq, h.last_received);
    // No GOODBYE: the agent must keep this session for the next process.
    if (current_) retire(current_);
    current_.reset();
    enter_closed("handed over to the next process", true);
    done(std::move(h), {});
  }

  // ---- streams --------------------------------------------------------------------------------

  void prepare_socket(tcp::socket& socket) {
    set_low_latency(socket);
    boost::system::error_code ec;
    socket.non_blocking(true, ec);
  }

  bool can_read(const LinkStream& s) const {
    return s.socket && !s.closed && !s.read_eof && s.credit > 0 && !s.armed && !draining_;
  }

  void make_ready(LinkStream& s) {
    if (s.queued || !can_read(s)) return;
    s.queued = true;
    ready_[priority_class(s.kind)].push_back(s.id);
  }

  void arm_read(const StreamPtr& s) {
    s->armed = true;
    s->socket->async_wait(tcp::socket::wait_read,
                          [weak = weak_from_this(), s](boost::system::error_code ec) {
                            s->armed = false;
                            auto self = weak.lock();
                            if (!self || s->closed) return;
                            if (ec && ec != asio::error::operation_aborted) {
                              self->reset_stream(s, "local socket error: " + ec.message());
                              self->pump();
                              return;
                            }
                            self->make_ready(*s);
                            self->pump();
                          });
  }

  // Reads the ready streams, highest class first, round-robin within a class, straight into the
  // replay buffer, as long as little is waiting to be written and the replay limit allows.
  void fill() {
    if (state_ == LinkState::closed) return;
    while (replay_.unsent_bytes() < unsent_target_ && replay_.bytes() < opts_.replay_limit) {
      std::size_t cls = 0;
      while (cls < ready_.size() && ready_[cls].empty()) ++cls;
      if (cls == ready_.size()) return;
      const std::uint32_t id = ready_[cls].front();
      ready_[cls].pop_front();
      auto it = streams_.find(id);
      if (it == streams_.end()) continue;
      StreamPtr s = it->second;
      s->queued = false;
      if (!can_read(*s)) continue;
      const std::size_t want =
          static_cast<std::size_t>(std::min<std::uint64_t>(s->credit, opts_.max_chunk));
      std::uint8_t* p = replay_.reserve(frame::kHeaderSize + want);
      boost::system::error_code ec;
      const std::size_t n = s->socket->read_some(asio::buffer(p + frame::kHeaderSize, want), ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) {
        arm_read(s);
        continue;
      }
      if (ec == asio::error::eof) {
        s->read_eof = true;
        append_sequenced(FrameType::fin, s->id, {});
        spdlog::debug("{} stream {} ({}) local EOF, FIN sent", log_, s->id, to_string(s->kind));
        maybe_finish(s);
        continue;
      }
      if (ec) {
        reset_stream(s, "local socket read failed: " + ec.message());
        continue;
      }
      frame::FrameHeader h;
      h.type = FrameType::data;
      h.stream_id = s->id;
      h.length = static_cast<std::uint32_t>(n);
      h.seq = replay_.next_seq();
      frame::encode_header(h, p);
      replay_.commit(frame::kHeaderSize + n);
      s->credit -= n;
      stats_.stream_bytes_out[static_cast<std::size_t>(s->kind)] += n;
      if (n < want) {
        arm_read(s);  // the socket is probably drained; wait instead of a read that would block
      } else {
        make_ready(*s);  // back of its class: round-robin
      }
    }
  }

  void start_write(const StreamPtr& s) {
    if (s->write_in_flight || s->pending.empty() || !s->socket || s->closed) return;
    std::swap(s->pending, s->writing);
    s->write_in_flight = true;
    asio::async_write(*s->socket, asio::buffer(s->writing),
                      [weak = weak_from_this(), s](boost::system::error_code ec, std::size_t n) {
                        s->write_in_flight = false;
                        auto self = weak.lock();
                        if (!self || s->closed) return;
                        self->on_stream_written(s, ec, n);
                      });
  }

  void on_stream_written(const StreamPtr& s, boost::system::error_code ec, std::size_t n) {
    if (ec) {
      reset_stream(s, "local socket write failed: " + ec.message());
      pump();
      return;
    }
    s->writing.clear();
    if (s->writing.capacity() > 4 * opts_.max_chunk) s->writing.shrink_to_fit();
    s->unreturned -= n;
    s->credit_to_return += n;
    // Credit goes back in quarter-window steps (not per write), so acks of small messages do not
    // cost a frame each; the sender still never stalls with bytes delivered here (see protocol.md).
    if (s->credit_to_return >= opts_.stream_window / 4 ||
        (s->pending.empty() && s->unreturned == 0 && s->credit_to_return >= opts_.max_chunk)) {
      std::array<std::uint8_t, 4> inc{};
      frame::put_u32(inc.data(), static_cast<std::uint32_t>(s->credit_to_return));
      s->credit_to_return = 0;
      append_sequenced(FrameType::credit, s->id, inc);
    }
    start_write(s);
    maybe_finish(s);
    pump();
  }

  // After the peer's FIN: shut down our write side once everything received has been written.
  // A stream ends when both directions are finished.
  void maybe_finish(const StreamPtr& s) {
    if (s->closed || !s->socket) return;
    if (s->peer_fin && !s->shut_down && !s->write_in_flight && s->pending.empty()) {
      boost::system::error_code ec;
      s->socket->shutdown(tcp::socket::shutdown_send, ec);
      s->shut_down = true;
    }
    if (s->shut_down && s->read_eof) {
      spdlog::debug("{} stream {} ({}) closed (both directions finished)", log_, s->id,
                    to_string(s->kind));
      drop_stream(s, false);
    }
  }

  void drop_stream(const StreamPtr& s, bool abortive) {
    s->closed = true;
    if (s->socket) {
      boost::system::error_code ec;
      if (abortive) s->socket->set_option(asio::socket_base::linger(true, 0), ec);
      s->socket->close(ec);
    }
    streams_.erase(s->id);
  }

  // Local error or refusal: tell the peer and forget the stream.
  void reset_stream(const StreamPtr& s, const std::string& reason) {
    if (s->closed) return;
    spdlog::info("{} stream {} ({}) reset: {}", log_, s->id, to_string(s->kind), reason);
    append_sequenced(FrameType::reset, s->id, text_bytes(reason, frame::kMaxReasonLength));
    drop_stream(s, true);
  }

  // ---- sequenced output -----------------------------------------------------------------------

  void append_sequenced(FrameType type, std::uint32_t stream, std::span<const std::uint8_t> p) {
    std::uint8_t* out = replay_.reserve(frame::kHeaderSize + p.size());
    frame::FrameHeader h;
    h.type = type;
    h.stream_id = stream;
    h.length = static_cast<std::uint32_t>(p.size());
    h.seq = replay_.next_seq();
    frame::encode_header(h, out);
    if (!p.empty()) std::memcpy(out + frame::kHeaderSize, p.data(), p.size());
    replay_.commit(frame::kHeaderSize + p.size());
  }

  // ---- transport I/O --------------------------------------------------------------------------

  void pump() {
    fill();
    if (current_ && current_->phase == TransportSlot::Phase::live) write_next(current_);
  }

  void write_next(const SlotPtr& slot) {
    if (slot->write_in_flight || slot->phase == TransportSlot::Phase::dead) return;
    asio::const_buffer buf;
    if (!slot->out.empty()) {
      slot->writing.clear();
      std::swap(slot->out, slot->writing);
      buf = asio::buffer(slot->writing);
      stats_.bytes_out += slot->writing.size();
      ++stats_.frames_out;
    } else if (slot->phase == TransportSlot::Phase::live && !slot->close_after_write &&
               replay_.take_unsent(slot->chunk)) {
      const auto& c = slot->chunk;
      if (c.first_seq <= high_water_seq_) count_retransmitted(c);
      high_water_seq_ = std::max(high_water_seq_, c.last_seq);
      if (replay_.acked() == c.first_seq - 1) unacked_since_ = clock_.now();
      buf = asio::buffer(c.data, c.size);
      stats_.bytes_out += c.size;
      stats_.frames_out += c.frames;
    } else {
      return;
    }
    slot->write_in_flight = true;
    slot->transport->async_write(
        buf, [weak = weak_from_this(), slot](boost::system::error_code ec, std::size_t) {
          slot->write_in_flight = false;
          slot->chunk.block.reset();
          auto self = weak.lock();
          if (!self || slot->phase == TransportSlot::Phase::dead) return;
          if (ec) {
            self->transport_error(slot, "write failed: " + ec.message());
            return;
          }
          if (slot->close_after_write && slot->out.empty()) {
            self->retire(slot);
            return;
          }
          self->write_next(slot);
          if (slot == self->current_) self->pump();
        });
  }

  void count_retransmitted(const ReplayBuffer::Chunk& c) {
    std::uint64_t seq = c.first_seq;
    for (std::size_t off = 0; off < c.size && seq <= high_water_seq_; ++seq) {
      const std::size_t len = frame::kHeaderSize + frame::parse_header(c.data + off).length;
      stats_.retransmitted_bytes += len;
      off += len;
    }
  }

  void start_read(const SlotPtr& slot) {
    auto buf = slot->decoder.prepare();
    slot->transport->async_read_some(
        asio::buffer(buf.data(), buf.size()),
        [weak = weak_from_this(), slot](boost::system::error_code ec, std::size_t n) {
          auto self = weak.lock();
          if (!self || slot->phase == TransportSlot::Phase::dead) return;
          if (ec) {
            self->transport_error(slot, ec == asio::error::eof
                                            ? std::string("peer closed the transport")
                                            : "read failed: " + ec.message());
            return;
          }
          self->on_bytes(slot, n);
        });
  }

  void on_bytes(const SlotPtr& slot, std::size_t n) {
    auto keep = shared_from_this();  // handlers called below may drop the owner's reference
    if (state_ == LinkState::closed) return;  // only a farewell write may still be pending
    slot->decoder.commit(n);
    stats_.bytes_in += n;
    last_rx_ = clock_.now();
    frame::DecodedFrame f;
    std::string err;
    while (slot->phase != TransportSlot::Phase::dead) {
      const auto st = slot->decoder.next(f, err);
      if (st == frame::FrameDecoder::Status::need_more) break;
      if (st == frame::FrameDecoder::Status::error) {
        protocol_error(slot, "malformed frame: " + err);
        return;
      }
      ++stats_.frames_in;
      on_frame(slot, f);
    }
    if (slot->phase != TransportSlot::Phase::dead) start_read(slot);
    pump();
  }

  void on_frame(const SlotPtr& slot, const frame::DecodedFrame& f) {
    switch (slot->phase) {
      case TransportSlot::Phase::handshaking:
        return on_handshake_frame(slot, f);
      case TransportSlot::Phase::resuming:
        return on_resume_frame(slot, f);
      case TransportSlot::Phase::live:
        return on_live_frame(slot, f);
      case TransportSlot::Phase::dead:
        return;
    }
  }

  // ---- handshake and resume -------------------------------------------------------------------

  void on_handshake_frame(const SlotPtr& slot, const frame::DecodedFrame& f) {
    const auto t = f.header.type;
    if (t != FrameType::hello && t != FrameType::challenge && t != FrameType::response &&
        t != FrameType::goodbye) {
      candidate_failed(slot, std::string(frame::to_string(t)) + " frame before authentication",
                       true);
      return;
    }
    const auto st = slot->handshake->on_frame(f, slot->out);
    if (st == LinkHandshake::Status::failed) {
      candidate_failed(slot, slot->handshake->error(), t != FrameType::goodbye);
      return;
    }
    if (st == LinkHandshake::Status::in_progress) {
      write_next(slot);
      return;
    }
    on_authenticated(slot);
  }

  void on_authenticated(const SlotPtr& slot) {
    const auto r = slot->handshake->result();
    slot->handshake.reset();  // drops its copy of the secret
    const char* peer = role_ == LinkSession::Role::bridge ? "agent" : "bridge";
    const char* me = role_ == LinkSession::Role::bridge ? "bridge" : "agent";
    if (!is_zero(peer_id_) && r.peer_session != peer_id_) {
      const std::string reason = std::string("the ") + peer + " restarted (session " +
                                 hex_id(peer_id_) + " is gone, now " + hex_id(r.peer_session) +
                                 "): link state lost, streams closed";
      spdlog::error("{} {}", log_, reason);
      slot->out.clear();
      send_goodbye(slot, reason);
      std::erase(candidates_, slot);
      if (current_) retire(current_);
      current_.reset();
      enter_closed(reason, false);
      return;
    }
    // A fresh agent asked to resume a session it never had: refuse the transport, keep this
    // session (the stale bridge closes itself by the check above). A fresh bridge facing an agent
    // that knew a previous bridge goes on: the agent, once it has authenticated this bridge,
    // closes its stale session with a clear reason (an unauthenticated refusal could not).
    if (role_ == LinkSession::Role::agent && !is_zero(r.peer_knows_me) &&
        r.peer_knows_me != self_id_) {
      candidate_failed(slot,
                       std::string("the ") + peer + " resumes session " + hex_id(r.peer_knows_me) +
                           ", which this " + me + " does not have (this " + me + " restarted?)",
                       true);
      return;
    }
    // From here on the old transport must deliver nothing more: the resume point we announce
    // has to be final, or frames would arrive twice.
    std::erase(candidates_, slot);
    if (current_) retire(current_);
    current_ = slot;
    // The peer's identity and window are committed when the resume completes (a peer that refuses
    // at the last step must not become "the" peer of this session).
    slot->peer = r;
    if (peer_window_ != 0 && r.peer_window != peer_window_) {
      // Credit already granted was computed with the first window; a change mid-session would
      // break the accounting.
      const std::string reason = std::string("the ") + peer + " changed its stream window from " +
                                 std::to_string(peer_window_) + " to " +
                                 std::to_string(r.peer_window) + " during the session";
      send_goodbye(slot, reason);
      current_.reset();
      enter_closed(reason, false);
      return;
    }
    slot->phase = TransportSlot::Phase::resuming;
    const auto last = frame::u64_bytes(last_received_);
    frame::append_frame(slot->out, FrameType::resume, 0, 0, last);
    slot->sent_resume = true;
    acked_sent_ = last_received_;
    write_next(slot);
  }

  void on_resume_frame(const SlotPtr& slot, const frame::DecodedFrame& f) {
    if (f.header.type == FrameType::goodbye) {
      if (!ever_up_) {
        // Refused before this session ever carried anything (e.g. the agent closed a stale
        // session of a previous bridge): this session stays usable for the next attempt.
        candidate_failed(slot, "the peer refused the link: " + payload_text(f.payload), false);
        return;
      }
      peer_goodbye(slot, f);
      return;
    }
    if (f.header.type != FrameType::resume) {
      protocol_error(slot, std::string("expected RESUME, got ") + frame::to_string(f.header.type));
      return;
    }
    const std::uint64_t point = frame::get_u64(f.payload.data());
    if (point < replay_.acked() || point > high_water_seq_) {
      const std::string reason = "the peer resumes after frame " + std::to_string(point) +
                                 " but this side has frames " +
                                 std::to_string(replay_.acked() + 1) + ".." +
                                 std::to_string(high_water_seq_) + " (state mismatch): link closed";
      spdlog::error("{} {}", log_, reason);
      send_goodbye(slot, reason);
      current_.reset();
      enter_closed(reason, false);
      return;
    }
    if (peer_window_ == 0) {
      peer_window_ = slot->peer.peer_window;
      peer_id_ = slot->peer.peer_session;
      for (auto& [id, s] : streams_) {
        s->credit = peer_window_;
        make_ready(*s);
      }
    }
    const std::size_t before = replay_.bytes();
    replay_.rewind(point);
    slot->timer.cancel();
    slot->phase = TransportSlot::Phase::live;
    const bool first = !ever_up_;
    ever_up_ = true;
    if (!first) ++stats_.resumes;
    last_rx_ = clock_.now();
    unacked_since_ = clock_.now();
    const std::string reason = first ? "authenticated on " + slot->name
                                     : "resumed on " + slot->name + " (peer had frames up to " +
                                           std::to_string(point) + ", retransmitting " +
                                           std::to_string(replay_.bytes()) + " of " +
                                           std::to_string(before) + " held bytes)";
    spdlog::info("{} {}", log_, reason);
    set_state(LinkState::up, reason);
    pump();
  }

  void candidate_failed(const SlotPtr& slot, const std::string& reason, bool tell_peer) {
    if (slot->phase == TransportSlot::Phase::dead) return;
    ++stats_.auth_failures;
    spdlog::warn("{} transport {} refused: {}", log_, slot->name, reason);
    std::erase(candidates_, slot);
    if (slot == current_) {
      // A resuming transport that fails is simply lost.
      current_.reset();
      retire(slot);
      if (state_ == LinkState::up || state_ == LinkState::connecting) {
        if (ever_up_) set_state(LinkState::down, reason);
      }
    } else if (tell_peer) {
      slot->out.clear();
      send_goodbye(slot, "link refused: " + reason);
    } else {
      retire(slot);
    }
    if (handlers_.on_candidate_failed) handlers_.on_candidate_failed(reason);
  }

  // ---- live frames ----------------------------------------------------------------------------

  void on_live_frame(const SlotPtr& slot, const frame::DecodedFrame& f) {
    const auto& h = f.header;
    if (!frame::is_sequenced(h.type)) {
      switch (h.type) {
        case FrameType::ack: {
          const std::uint64_t a = frame::get_u64(f.payload.data());
          if (a < replay_.acked() || a > replay_.sent()) {
            protocol_error(slot, "ACK " + std::to_string(a) + " outside the sent range " +
                                     std::to_string(replay_.acked()) + ".." +
                                     std::to_string(replay_.sent()));
            return;
          }
          if (a > replay_.acked()) {
            replay_.ack(a);
            unacked_since_ = clock_.now();
          }
          return;
        }
        case FrameType::ping:
          frame::append_frame(slot->out, FrameType::pong, 0, 0, f.payload);
          write_next(slot);
          return;
        case FrameType::pong:
          ping_outstanding_ = false;
          return;
        case FrameType::goodbye:
          peer_goodbye(slot, f);
          return;
        default:
          protocol_error(slot,
                         std::string("unexpected ") + frame::to_string(h.type) + " on a live link");
          return;
      }
    }
    // Quiescing for a handover: the peer's frames are left to it (unacknowledged, it keeps them)
    // and go to the next process after the resume, so what was delivered here stays final.
    if (draining_) return;
    if (h.seq != last_received_ + 1) {
      protocol_error(slot, "out-of-order frame: expected sequence number " +
                               std::to_string(last_received_ + 1) + ", got " +
                               std::to_string(h.seq));
      return;
    }
    // Semantic errors of an authenticated peer are deterministic (a retransmission would repeat
    // them), so they end the session instead of looping through reconnects.
    std::string err = apply(h, f.payload);
    if (!err.empty()) {
      const std::string reason = "protocol error from the peer: " + err;
      spdlog::error("{} {} (transport {})", log_, reason, slot->name);
      send_goodbye(slot, reason);
      current_.reset();
      enter_closed(reason, false);
      return;
    }
    last_received_ = h.seq;
    recv_unacked_bytes_ += frame::kHeaderSize + h.length;
    if (recv_unacked_bytes_ >= ack_threshold_) {
      send_ack(slot);
    } else if (!ack_timer_armed_) {
      ack_timer_armed_ = true;
      // Cancelled only when the session closes, after which nothing re-arms it.
      ack_timer_.wait(opts_.ack_delay, [weak = weak_from_this()] {
        auto self = weak.lock();
        if (!self) return;
        self->ack_timer_armed_ = false;
        if (self->current_ && self->current_->phase == TransportSlot::Phase::live) {
          self->send_ack(self->current_);
        }
      });
    }
  }

  void send_ack(const SlotPtr& slot) {
    if (last_received_ == acked_sent_) return;
    frame::append_frame(slot->out, FrameType::ack, 0, 0, frame::u64_bytes(last_received_));
    acked_sent_ = last_received_;
    recv_unacked_bytes_ = 0;
    write_next(slot);
  }

  // Applies one in-order sequenced frame. Returns an error text for a protocol violation.
  std::string apply(const frame::FrameHeader& h, std::span<const std::uint8_t> payload) {
    const std::uint32_t id = h.stream_id;
    if (h.type == FrameType::control) {
      auto msg = nlohmann::json::parse(payload.begin(), payload.end(), nullptr, false);
      if (msg.is_discarded() || !msg.is_object()) {
        // Not a link failure: the frame was delivered; the message itself is unusable.
        spdlog::error("{} control message from the peer is not a JSON object ({} bytes); ignored",
                      log_, payload.size());
        return {};
      }
      if (handlers_.on_control) handlers_.on_control(msg);
      return {};
    }
    if (h.type == FrameType::open) {
      if (role_ != LinkSession::Role::agent)
        return "the agent sent OPEN (only the bridge opens streams)";
      if (id <= max_peer_stream_) {
        return "OPEN of stream " + std::to_string(id) + " after stream " +
               std::to_string(max_peer_stream_) + " (ids must increase)";
      }
      max_peer_stream_ = id;
      const auto kind = static_cast<ChannelKind>(payload[0]);
      auto s = std::make_shared<LinkStream>(id, kind);
      s->credit = peer_window_;
      streams_.emplace(id, s);
      ++stats_.streams_opened;
      if (streams_.size() > opts_.max_streams) {
        reset_stream(s, "too many streams (" + std::to_string(opts_.max_streams) + ")");
      } else if (!handlers_.on_stream_request) {
        reset_stream(s, "this side accepts no streams");
      } else {
        spdlog::debug("{} stream {} ({}) requested", log_, id, to_string(kind));
        handlers_.on_stream_request(id, kind);
      }
      return {};
    }
    auto it = streams_.find(id);
    if (it == streams_.end()) {
      const bool known =
          role_ == LinkSession::Role::bridge ? id < next_stream_id_ : id <= max_peer_stream_;
      if (!known) {
        return std::string(frame::to_string(h.type)) + " for unknown stream " + std::to_string(id);
      }
      // The stream ended here while the peer was still sending (e.g. our RESET crossed its data).
      spdlog::debug("{} {} for closed stream {} discarded", log_, frame::to_string(h.type), id);
      return {};
    }
    StreamPtr s = it->second;
    switch (h.type) {
      case FrameType::data: {
        if (s->peer_fin) return "DATA after FIN on stream " + std::to_string(id);
        s->unreturned += payload.size();
        if (s->unreturned > opts_.stream_window) {
          return "stream " + std::to_string(id) + " exceeded its credit (" +
                 std::to_string(s->unreturned) + " bytes in flight, window " +
                 std::to_string(opts_.stream_window) + ")";
        }
        s->pending.insert(s->pending.end(), payload.begin(), payload.end());
        stats_.stream_bytes_in[static_cast<std::size_t>(s->kind)] += payload.size();
        start_write(s);
        return {};
      }
      case FrameType::credit: {
        const std::uint64_t inc = frame::get_u32(payload.data());
        if (s->credit + inc > peer_window_) {
          return "CREDIT of " + std::to_string(inc) + " on stream " + std::to_string(id) +
                 " overflows the window (" + std::to_string(s->credit) + " + " +
                 std::to_string(inc) + " > " + std::to_string(peer_window_) + ")";
        }
        s->credit += inc;
        make_ready(*s);
        return {};
      }
      case FrameType::fin:
        if (s->peer_fin) return "second FIN on stream " + std::to_string(id);
        s->peer_fin = true;
        spdlog::debug("{} stream {} ({}) FIN from peer", log_, id, to_string(s->kind));
        maybe_finish(s);
        return {};
      case FrameType::reset:
        spdlog::info("{} stream {} ({}) reset by peer: {}", log_, id, to_string(s->kind),
                     payload_text(payload));
        drop_stream(s, true);
        return {};
      default:
        return std::string("unexpected ") + frame::to_string(h.type);
    }
  }

  // ---- failures and state ---------------------------------------------------------------------

  void peer_goodbye(const SlotPtr& slot, const frame::DecodedFrame& f) {
    const std::string reason = "the peer closed the link: " + payload_text(f.payload);
    spdlog::info("{} {}", log_, reason);
    retire(slot);
    if (slot == current_) current_.reset();
    enter_closed(reason, false);
  }

  // A framing or link-level violation: the transport is closed; the session may resume.
  void protocol_error(const SlotPtr& slot, const std::string& what) {
    if (slot->phase == TransportSlot::Phase::handshaking) {
      candidate_failed(slot, what, true);
      return;
    }
    transport_error(slot, "protocol error: " + what);
  }

  void transport_error(const SlotPtr& slot, const std::string& what) {
    if (slot->phase == TransportSlot::Phase::dead) return;
    if (slot != current_) {
      candidate_failed(slot, what, false);
      return;
    }
    if (slot->phase == TransportSlot::Phase::resuming) {
      candidate_failed(slot, what, false);
      return;
    }
    const std::string reason = "transport " + slot->name + " lost: " + what;
    spdlog::warn("{} {}", log_, reason);
    retire(slot);
    current_.reset();
    if (state_ != LinkState::closed) set_state(LinkState::down, reason);
  }

  void send_goodbye(const SlotPtr& slot, const std::string& reason) {
    frame::append_frame(slot->out, FrameType::goodbye, 0, 0,
                        text_bytes(reason, frame::kMaxReasonLength));
    slot->close_after_write = true;
    // Bounded wait for a peer that does not read.
    slot->timer.wait(std::chrono::seconds(1), [weak = weak_from_this(), slot] {
      if (auto self = weak.lock()) self->retire(slot);
    });
    if (slot->phase == TransportSlot::Phase::live) slot->phase = TransportSlot::Phase::resuming;
    write_next(slot);
  }

  void retire(const SlotPtr& slot) {
    if (slot->phase == TransportSlot::Phase::dead) return;
    slot->phase = TransportSlot::Phase::dead;
    slot->timer.cancel();
    slot->transport->close();
    std::erase(candidates_, slot);
  }

  void enter_closed(const std::string& reason, bool quiet) {
    if (state_ == LinkState::closed) return;
    closed_reason_ = reason;
    for (auto& c : std::vector<SlotPtr>(candidates_)) {
      if (!c->close_after_write) retire(c);
    }
    candidates_.clear();
    auto streams = std::move(streams_);
    streams_.clear();
    for (auto& [id, s] : streams) {
      s->closed = true;
      if (s->socket) {
        boost::system::error_code ec;
        s->socket->close(ec);
      }
    }
    for (auto& q : ready_) q.clear();
    ack_timer_.cancel();
    tick_timer_.cancel();
    quiet_timer_.cancel();
    state_ = LinkState::closed;
    if (!quiet && handlers_.on_state) handlers_.on_state(LinkState::closed, reason);
  }

  void set_state(LinkState s, const std::string& reason) {
    state_ = s;
    if (s == LinkState::down) ping_outstanding_ = false;
    if (handlers_.on_state) handlers_.on_state(s, reason);
  }

  // Liveness: a live transport that delivers nothing, or does not acknowledge what we sent, for
  // liveness_timeout is dead (a peer that stopped reading holds our replay buffer full).
  void schedule_tick() {
    const auto period = std::max<std::chrono::milliseconds>(opts_.liveness_timeout / 6,
                                                            std::chrono::milliseconds(5));
    tick_timer_.wait(period, [weak = weak_from_this()] {
      auto self = weak.lock();
      if (!self || self->state_ == LinkState::closed) return;
      self->tick();
      self->schedule_tick();
    });
  }

  void tick() {
    if (replay_.bytes() == 0) replay_.trim();
    if (!current_ || current_->phase != TransportSlot::Phase::live) return;
    const auto now = clock_.now();
    const auto timeout = opts_.liveness_timeout;
    auto ms = [](auto d) {
      return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
    };
    if (replay_.sent() > replay_.acked() && now - unacked_since_ > timeout) {
      transport_error(current_, "no acknowledgement for " + ms(now - unacked_since_) +
                                    " ms (peer stopped reading?)");
      return;
    }
    if (now - last_rx_ > timeout) {
      transport_error(current_, "nothing received for " + ms(now - last_rx_) + " ms");
      return;
    }
    if (!ping_outstanding_ && now - last_rx_ > timeout / 3) {
      ping_outstanding_ = true;
      frame::append_frame(current_->out, FrameType::ping, 0, 0, frame::u64_bytes(++ping_counter_));
      write_next(current_);
    }
  }

  asio::io_context& io_;
  LinkSession::Role role_;
  kb::auth::LinkSecret secret_;
  LinkSession::Options opts_;
  LinkSession::Handlers handlers_;
  std::string log_;
  SessionId self_id_{};
  SessionId peer_id_{};
  std::uint32_t peer_window_ = 0;  // 0 until the first authentication
  LinkState state_ = LinkState::connecting;
  bool ever_up_ = false;
  std::string closed_reason_;

  std::unordered_map<std::uint32_t, StreamPtr> streams_;
  std::array<std::deque<std::uint32_t>, kChannelKinds> ready_;
  std::uint32_t next_stream_id_ = 1;   // bridge
  std::uint32_t max_peer_stream_ = 0;  // agent

  ReplayBuffer replay_;
  std::size_t unsent_target_;
  std::uint64_t high_water_seq_ = 0;  // highest seq ever written on any transport
  std::uint64_t last_received_ = 0;
  std::uint64_t acked_sent_ = 0;
  std::size_t recv_unacked_bytes_ = 0;
  std::size_t ack_threshold_;
  bool ack_timer_armed_ = false;
  std::unique_ptr<kb::Clock> real_clock_;  // when opts_.clock is null
  kb::Clock& clock_;
  kb::ClockTimer ack_timer_;
  kb::ClockTimer tick_timer_;
  kb::ClockTimer quiet_timer_;
  Clock::time_point last_rx_{}, unacked_since_{};
  // Quiescing for a handover: local sockets are not read, the peer's frames are not taken.
  bool draining_ = false;
  std::function<void(std::optional<LinkHandover>, const std::string&)> quiesce_done_;
  Clock::time_point quiesce_deadline_{};
  bool ping_outstanding_ = false;
  std::uint64_t ping_counter_ = 0;

  SlotPtr current_;  // the transport that is live (or resuming)
  std::vector<SlotPtr> candidates_;
  LinkSession::Stats stats_;
};

// ---- LinkSession facade -------------------------------------------------------------------------

std::shared_ptr<LinkSession> LinkSession::create(asio::io_context& io, Role role,
                                                 kb::auth::LinkSecret secret, Options options,
                                                 Handlers handlers) {
  std::shared_ptr<LinkSession> s(new LinkSession());
  s->impl_ = std::make_shared<LinkSessionImpl>(io, role, std::move(secret), std::move(options),
                                               std::move(handlers));
  s->impl_->start();
  return s;
}

std::shared_ptr<LinkSession> LinkSession::resume_handed_over(asio::io_context& io,
                                                             kb::auth::LinkSecret secret,
                                                             Options options, Handlers handlers,
                                                             const LinkHandover& handover) {
  std::shared_ptr<LinkSession> s(new LinkSession());
  s->impl_ = std::make_shared<LinkSessionImpl>(io, Role::bridge, std::move(secret),
                                               std::move(options), std::move(handlers));
  try {
    s->impl_->adopt(handover);
  } catch (...) {
    for (const auto& st : handover.streams) {
      if (st.fd >= 0) ::close(st.fd);
    }
    throw;
  }
  s->impl_->start();
  return s;
}

void LinkSession::quiesce(
    std::chrono::milliseconds timeout,
    std::function<void(std::optional<LinkHandover>, const std::string& why_not)> done) {
  impl_->quiesce(timeout, std::move(done));
}

LinkSession::~LinkSession() {
  if (impl_) impl_->shutdown_quietly();
}

std::uint32_t LinkSession::add_local_stream(ChannelKind kind, tcp::socket socket) {
  return impl_->add_local_stream(kind, std::move(socket));
}
void LinkSession::attach_stream(std::uint32_t id, tcp::socket socket) {
  impl_->attach_stream(id, std::move(socket));
}
void LinkSession::refuse_stream(std::uint32_t id, const std::string& reason) {
  impl_->refuse_stream(id, reason);
}
void LinkSession::attach_transport(ByteTransportPtr transport) {
  impl_->attach_transport(std::move(transport));
}
bool LinkSession::send_control(const nlohmann::json& message) {
  return impl_->send_control(message);
}
void LinkSession::close(const std::string& reason) {
  impl_->close(reason);
}
LinkState LinkSession::state() const {
  return impl_->state();
}
LinkSession::Stats LinkSession::stats() const {
  return impl_->stats();
}
std::string LinkSession::session_id() const {
  return impl_->session_id();
}

}  // namespace kb::tunnel
