#include "tunnel/hub_kernel.hpp"

#include "link/process_exit.hpp"
#include "link/tcp_transport.hpp"

#include <spdlog/spdlog.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/address.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

namespace kb::tunnel {

namespace asio = boost::asio;
using boost::system::error_code;

TransportProvider make_direct_provider(asio::io_context& io, std::string host, std::uint16_t port,
                                       std::chrono::milliseconds timeout) {
  return [&io, host = std::move(host), port, timeout](std::function<void(TransportResult)> done) {
    struct Attempt {
      asio::ip::tcp::resolver resolver;
      asio::ip::tcp::socket socket;
      asio::steady_timer timer;
      std::function<void(TransportResult)> done;
      bool finished = false;
      explicit Attempt(asio::io_context& io) : resolver(io), socket(io), timer(io) {}
      void finish(TransportResult r) {
        if (finished) return;
        finished = true;
        timer.cancel();
        auto handler = std::move(done);
        handler(std::move(r));
      }
    };
    auto attempt = std::make_shared<Attempt>(io);
    attempt->done = std::move(done);
    std::string where = host + ":" + std::to_string(port);
    attempt->timer.expires_after(timeout);
    attempt->timer.async_wait([attempt, where, timeout](const error_code& ec) {
      if (ec || attempt->finished) return;
      attempt->resolver.cancel();
      error_code ignored;
      attempt->socket.close(ignored);
      attempt->finish({asio::error::timed_out,
                       "cannot connect to the agent at " + where + ": no answer within " +
                           std::to_string(timeout.count() / 1000) + " s",
                       nullptr});
    });
    attempt->resolver.async_resolve(
        host, std::to_string(port),
        [attempt, where](const error_code& ec, asio::ip::tcp::resolver::results_type results) {
          if (attempt->finished) return;
          if (ec) {
            attempt->finish(
                {ec, "cannot resolve the agent's host in " + where + ": " + ec.message(), nullptr});
            return;
          }
          asio::async_connect(
              attempt->socket, results,
              [attempt, where](const error_code& ec, const asio::ip::tcp::endpoint&) {
                if (attempt->finished) return;
                if (ec) {
                  attempt->finish({ec,
                                   "cannot connect to the agent at " + where + ": " + ec.message(),
                                   nullptr});
                  return;
                }
                attempt->finish({{}, {}, make_tcp_transport(std::move(attempt->socket))});
              });
        });
  };
}

std::shared_ptr<HubKernel> HubKernel::create(asio::io_context& io, Options options,
                                             TransportProvider provider, EventSink events) {
  return std::shared_ptr<HubKernel>(
      new HubKernel(io, std::move(options), std::move(provider), std::move(events)));
}

HubKernel::HubKernel(asio::io_context& io, Options options, TransportProvider provider,
                     EventSink events)
    : io_(io),
      options_(std::move(options)),
      provider_(std::move(provider)),
      events_(std::move(events)),
      log_id_("k" + std::to_string(options_.index)),
      retry_timer_(io),
      stable_timer_(io),
      shutdown_timer_(io),
      backoff_({options_.backoff_min, options_.backoff_max, 2.0, kb::Jitter::equal},
               kb::backoff_seed()) {}

HubKernel::~HubKernel() {
  if (session_) session_->close("bridge stopped");
}

void HubKernel::emit(const HubEvent& event) {
  if (events_) events_(event);
}

const ConnectionInfo& HubKernel::listen() {
  ConnectionInfo& info = options_.connection;
  error_code ec;
  auto address = asio::ip::make_address(options_.bind_address, ec);
  if (ec) {
    throw HubKernelError("--bind " + options_.bind_address + " is not an IP address");
  }
  for (ChannelKind kind : kAllChannelKinds) {
    auto i = static_cast<std::size_t>(kind);
    auto& acceptor = acceptors_[i].emplace(io_);
    asio::ip::tcp::endpoint endpoint(address, info.port(kind));
    acceptor.open(endpoint.protocol(), ec);
    // Jupyter restarts a kernel on the same ports; a connection in TIME_WAIT must not block that.
    if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor.bind(endpoint, ec);
    if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      throw HubKernelError("kernel " + std::to_string(options_.index) + ": cannot listen on " +
                           options_.bind_address + ":" + std::to_string(info.port(kind)) +
                           " for its " + to_string(kind) + " channel: " + ec.message());
    }
    if (info.port(kind) == 0) info.port(kind) = acceptor.local_endpoint().port();
  }

  session_ = LinkSession::create(io_, LinkSession::Role::bridge, options_.secret, link_options(),
                                 link_handlers());
  return info;
}

LinkSession::Handlers HubKernel::link_handlers() {
  LinkSession::Handlers handlers;
  std::weak_ptr<HubKernel> weak = weak_from_this();
  handlers.on_control = [weak](const nlohmann::json& m) {
    if (auto self = weak.lock()) self->on_control(m);
  };
  handlers.on_state = [weak](LinkState s, const std::string& reason) {
    if (auto self = weak.lock()) self->on_link_state(s, reason);
  };
  handlers.on_candidate_failed = [weak](const std::string& reason) {
    auto self = weak.lock();
    if (!self || self->closed_) return;
    std::string message = "link to the agent at " + self->options_.agent +
                          " refused (authentication or handshake failed): " + reason;
    spdlog::warn("[{}] {}", self->log_id_, message);
    self->emit(hub_event::Error{message});
    self->schedule_retry(reason);
  };
  return handlers;
}

LinkSession::Options HubKernel::link_options() const {
  auto link_options = options_.link;
  if (link_options.log_id.empty()) link_options.log_id = log_id_;
  return link_options;
}

const ConnectionInfo& HubKernel::adopt(const HubHandover& handover) {
  // On failure every descriptor is closed once: the adopted listeners by their acceptors, the
  // rest here.
  auto fail = [this, &handover](std::size_t adopted, const std::string& why) {
    for (auto& a : acceptors_) a.reset();
    for (std::size_t i = adopted; i < kChannelKinds; ++i) {
      if (handover.listeners[i] >= 0) ::close(handover.listeners[i]);
    }
    for (const auto& st : handover.link.streams) {
      if (st.fd >= 0) ::close(st.fd);
    }
    throw HubKernelError("kernel " + std::to_string(options_.index) + ": " + why);
  };
  ConnectionInfo& info = options_.connection;
  for (ChannelKind kind : kAllChannelKinds) {
    auto i = static_cast<std::size_t>(kind);
    const int fd = handover.listeners[i];
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    int listening = 0;
    socklen_t optlen = sizeof(listening);
    if (fd < 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        (addr.ss_family != AF_INET && addr.ss_family != AF_INET6) ||
        ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || !listening) {
      fail(i, std::string("the handed-over ") + to_string(kind) +
                  " listener is not a listening TCP socket");
    }
    auto& acceptor = acceptors_[i].emplace(io_);
    error_code ec;
    acceptor.assign(addr.ss_family == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), fd, ec);
    if (ec) {
      acceptors_[i].reset();  // it does not own fd: fail() closes it
      fail(i,
           std::string("cannot take over the ") + to_string(kind) + " listener: " + ec.message());
    }
    info.port(kind) = acceptor.local_endpoint().port();
  }
  try {
    session_ = LinkSession::resume_handed_over(io_, options_.secret, link_options(),
                                               link_handlers(), handover.link);
  } catch (const std::exception& e) {
    for (auto& a : acceptors_) a.reset();  // closes the listeners
    throw HubKernelError("kernel " + std::to_string(options_.index) +
                         ": cannot take over its link session: " + e.what());
  }
  start_sent_ = true;  // the kernel runs: the agent is not asked to start it
  return info;
}

void HubKernel::quiesce(
    std::chrono::milliseconds timeout,
    std::function<void(std::optional<HubHandover>, const std::string& why_not)> done) {
  if (closed_ || !session_ || quiescing_) {
    done(std::nullopt, closed_ ? "the kernel's link is closed" : "not listening");
    return;
  }
  quiescing_ = true;
  error_code ec;
  for (auto& acceptor : acceptors_) {
    if (acceptor) acceptor->cancel(ec);
  }
  retry_timer_.cancel();
  std::weak_ptr<HubKernel> weak = weak_from_this();
  session_->quiesce(
      timeout, [weak, done](std::optional<LinkHandover> link, const std::string& why) {
        auto self = weak.lock();
        if (!self || !link) {
          done(std::nullopt, self ? why : std::string("the kernel is gone"));
          return;
        }
        HubHandover h;
        h.link = std::move(*link);
        for (std::size_t i = 0; i < kChannelKinds; ++i) {
          auto& acceptor = self->acceptors_[i];
          h.listeners[i] = acceptor ? ::fcntl(acceptor->native_handle(), F_DUPFD_CLOEXEC, 3) : -1;
          if (h.listeners[i] < 0) {
            for (int fd : h.listeners) {
              if (fd >= 0) ::close(fd);
            }
            for (const auto& st : h.link.streams) ::close(st.fd);
            done(std::nullopt, std::string("cannot duplicate a listener: ") + std::strerror(errno));
            return;
          }
        }
        // Handed over: closed here without a word to the agent and without a Closed event.
        self->closed_ = true;
        self->stable_timer_.cancel();
        self->shutdown_timer_.cancel();
        error_code ignored;
        for (auto& acceptor : self->acceptors_) {
          if (acceptor) acceptor->close(ignored);
        }
        for (auto& timer : self->accept_retry_) {
          if (timer) timer->cancel();
        }
        spdlog::info("[{}] handed over to the next process", self->log_id_);
        done(std::move(h), {});
      });
}

void HubKernel::start() {
  if (!session_)
    throw HubKernelError("kernel " + std::to_string(options_.index) +
                         ": start() before listen(): call listen() first");
  const ConnectionInfo& info = options_.connection;
  spdlog::info("[{}] listening on {} (shell {} iopub {} stdin {} control {} hb {}); agent {}",
               log_id_, options_.bind_address, info.port(ChannelKind::shell),
               info.port(ChannelKind::iopub), info.port(ChannelKind::stdin_),
               info.port(ChannelKind::control), info.port(ChannelKind::hb), options_.agent);
  emit(hub_event::Listening{info.ports});
  for (std::size_t i = 0; i < kChannelKinds; ++i) accept_next(i);
  request_transport();
}

void HubKernel::accept_next(std::size_t i) {
  if (closed_ || quiescing_ || !acceptors_[i]) return;
  std::weak_ptr<HubKernel> weak = weak_from_this();
  acceptors_[i]->async_accept([weak, i](const error_code& ec, asio::ip::tcp::socket socket) {
    auto self = weak.lock();
    if (!self || self->closed_ || ec == asio::error::operation_aborted) return;
    auto kind = kAllChannelKinds[i];
    if (self->quiescing_ && ec) return;
    if (ec) {
      bool exhausted = ec == asio::error::no_descriptors || ec.value() == ENFILE;
      auto delay = std::chrono::milliseconds(exhausted ? 500 : 50);
      spdlog::warn("[{}] accept on the {} port failed: {}; retrying in {} ms", self->log_id_,
                   to_string(kind), ec.message(), delay.count());
      auto& timer = self->accept_retry_[i];
      if (!timer) timer = std::make_unique<asio::steady_timer>(self->io_);
      timer->expires_after(delay);
      timer->async_wait([weak, i](const error_code& e) {
        if (auto s = weak.lock(); s && !e) s->accept_next(i);
      });
      return;
    }
    std::uint32_t id = self->session_->add_local_stream(kind, std::move(socket));
    if (id == 0) {
      spdlog::warn("[{}] {} connection refused by the link (closed or too many streams)",
                   self->log_id_, to_string(kind));
    } else {
      spdlog::debug("[{}] {} connection accepted as stream {}", self->log_id_, to_string(kind), id);
    }
    self->accept_next(i);
  });
}

void HubKernel::request_transport() {
  if (closed_ || failed_permanently_ || attempt_in_flight_ || quiescing_) return;
  attempt_in_flight_ = true;
  ++attempts_;
  std::weak_ptr<HubKernel> weak = weak_from_this();
  provider_([weak](TransportResult result) {
    auto self = weak.lock();
    if (!self) return;
    self->attempt_in_flight_ = false;
    if (self->closed_) return;
    if (result.ec || !result.transport) {
      if (result.permanent) {
        self->failed_permanently_ = true;
        spdlog::error("[{}] giving up on the agent at {}: {}", self->log_id_, self->options_.agent,
                      result.message);
        self->emit(hub_event::Error{result.message});
        return;
      }
      spdlog::warn("[{}] {}", self->log_id_, result.message);
      self->schedule_retry(result.message);
      return;
    }
    spdlog::debug("[{}] candidate transport {}: authenticating", self->log_id_,
                  result.transport->describe());
    self->session_->attach_transport(std::move(result.transport));
  });
}

void HubKernel::schedule_retry(const std::string& why) {
  if (closed_ || failed_permanently_ || retry_scheduled_) return;
  // Half fixed, half random: retries of many kernels spread out and never come back-to-back.
  auto delay = backoff_.next();
  retry_scheduled_ = true;
  spdlog::info("[{}] next attempt to reach the agent in {} ms ({})", log_id_, delay.count(), why);
  std::weak_ptr<HubKernel> weak = weak_from_this();
  retry_timer_.expires_after(delay);
  retry_timer_.async_wait([weak](const error_code& ec) {
    auto self = weak.lock();
    if (!self) return;
    self->retry_scheduled_ = false;
    if (!ec) self->request_transport();
  });
}

void HubKernel::on_link_state(LinkState state, const std::string& reason) {
  switch (state) {
    case LinkState::connecting:
      return;
    case LinkState::up:
      spdlog::info("[{}] link up (agent {})", log_id_, options_.agent);
      emit(hub_event::LinkUp{});
      if (!start_sent_) {
        start_sent_ = true;
        const ConnectionInfo& info = options_.connection;
        session_->send_control({{"type", "start_kernel"},
                                {"key", info.key},
                                {"signature_scheme", info.signature_scheme},
                                {"kernel_name", info.kernel_name}});
      }
      // Keep the backoff until the link has proven stable, so a flapping link is not hammered.
      retry_timer_.cancel();
      stable_timer_.expires_after(std::chrono::seconds(5));
      stable_timer_.async_wait([weak = weak_from_this()](const error_code& ec) {
        auto self = weak.lock();
        if (!ec && self && self->session_->state() == LinkState::up) {
          self->backoff_.reset();
        }
      });
      return;
    case LinkState::down:
      spdlog::warn("[{}] link down: {}", log_id_, reason);
      emit(hub_event::LinkDown{reason});
      if (agent_terminating_) {
        close("the agent terminated (" + reason + ")");
        return;
      }
      if (backoff_.steps() == 0) {
        request_transport();  // a first drop after a stable period: try again at once
      } else {
        schedule_retry(reason);
      }
      return;
    case LinkState::closed:
      if (closed_) return;
      close(reason);
      return;
  }
}

// The agent's messages are JSON (docs/agent.md); from here on they are typed. A field of the
// wrong type reads as absent.
void HubKernel::on_control(const nlohmann::json& m) {
  auto text = [&m](const char* field) {
    auto it = m.find(field);
    return it != m.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  auto integer = [&m](const char* field) -> std::optional<int> {
    auto it = m.find(field);
    if (it == m.end() || !it->is_number_integer()) return std::nullopt;
    return it->get<int>();
  };
  std::string type = m.is_object() ? text("type") : std::string();
  if (type == "kernel_started") {
    auto restart = m.find("restart");
    bool is_restart = restart != m.end() && restart->is_boolean() && restart->get<bool>();
    emit(hub_event::KernelStarted{integer("pid").value_or(0), is_restart});
  } else if (type == "kernel_exited") {
    hub_event::KernelExited exited{integer("code"), std::nullopt};
    std::string signal = text("signal");
    if (!signal.empty()) {
      exited.signal = ProcessExit::signal_number(signal);
      if (!exited.signal) {
        spdlog::warn(
            "[{}] the agent reported the kernel killed by \"{}\", which is not a signal "
            "name; reported without a signal",
            log_id_, signal);
      }
    }
    emit(exited);
  } else if (type == "agent_terminating") {
    agent_terminating_ = true;
    emit(hub_event::AgentTerminating{text("reason")});
  } else if (type == "error") {
    emit(hub_event::Error{"agent: " + text("message")});
  } else {
    spdlog::warn("[{}] unknown control message from the agent ignored: {}", log_id_,
                 type.empty() ? std::string("(no type)") : type);
  }
}

void HubKernel::interrupt() {
  if (closed_) {
    emit(hub_event::Error{"interrupt: this kernel's link is closed"});
    return;
  }
  session_->send_control({{"type", "interrupt"}});
}

void HubKernel::restart() {
  if (closed_) {
    emit(hub_event::Error{"restart: this kernel's link is closed"});
    return;
  }
  session_->send_control({{"type", "restart_kernel"}});
}

void HubKernel::shutdown(std::function<void()> done) {
  if (closed_) {
    if (done) done();
    return;
  }
  if (shutting_down_) {
    // Chain a second caller onto the first.
    auto first = std::move(shutdown_done_);
    shutdown_done_ = [first, done] {
      if (first) first();
      if (done) done();
    };
    return;
  }
  shutting_down_ = true;
  shutdown_done_ = std::move(done);
  if (!start_sent_ || failed_permanently_) {
    close("shut down before the agent was reached");
    return;
  }
  spdlog::info("[{}] asking the agent to shut down", log_id_);
  session_->send_control({{"type", "shutdown"}});
  std::weak_ptr<HubKernel> weak = weak_from_this();
  shutdown_timer_.expires_after(options_.shutdown_timeout);
  shutdown_timer_.async_wait([weak](const error_code& ec) {
    auto self = weak.lock();
    if (!self || ec || self->closed_) return;
    self->close("the agent did not confirm the shutdown within " +
                std::to_string(self->options_.shutdown_timeout.count() / 1000) + " s");
  });
}

void HubKernel::close(const std::string& reason) {
  if (closed_) return;
  closed_ = true;
  retry_timer_.cancel();
  stable_timer_.cancel();
  shutdown_timer_.cancel();
  error_code ec;
  for (auto& acceptor : acceptors_) {
    if (acceptor) acceptor->close(ec);
  }
  for (auto& timer : accept_retry_) {
    if (timer) timer->cancel();
  }
  spdlog::info("[{}] closed: {}", log_id_, reason);
  emit(hub_event::Closed{reason});
  if (session_ && session_->state() != LinkState::closed) session_->close(reason);
  finish_shutdown();
}

void HubKernel::finish_shutdown() {
  auto done = std::move(shutdown_done_);
  shutdown_done_ = nullptr;
  if (done) done();
}

HubKernelStats HubKernel::stats() const {
  HubKernelStats s;
  s.attempts = attempts_;
  if (session_) {
    s.link = session_->stats();
    s.state = session_->state();
  }
  if (closed_) s.state = LinkState::closed;
  return s;
}

}  // namespace kb::tunnel
