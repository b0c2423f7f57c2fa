#include "unicore/http_engine.hpp"

#include <curl/curl.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cctype>
#include <mutex>
#include <unordered_map>

namespace kb::unicore {

namespace asio = boost::asio;

const char* to_string(TransportError error) {
  switch (error) {
    case TransportError::none:
      return "none";
    case TransportError::resolve:
      return "resolve";
    case TransportError::connect:
      return "connect";
    case TransportError::tls:
      return "tls";
    case TransportError::timeout:
      return "timeout";
    case TransportError::body_too_large:
      return "body_too_large";
    case TransportError::send:
      return "send";
    case TransportError::receive:
      return "receive";
    case TransportError::other:
      return "other";
  }
  return "other";
}

const std::string* HttpResponse::header(std::string_view lower_name) const {
  for (auto it = headers.rbegin(); it != headers.rend(); ++it) {
    if (it->first == lower_name) return &it->second;
  }
  return nullptr;
}

namespace {

struct EasyDeleter {
  void operator()(CURL* easy) const { curl_easy_cleanup(easy); }
};
struct SlistDeleter {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};
struct MultiDeleter {
  void operator()(CURLM* multi) const { curl_multi_cleanup(multi); }
};

using EasyHandle = std::unique_ptr<CURL, EasyDeleter>;
using HeaderList = std::unique_ptr<curl_slist, SlistDeleter>;
using MultiHandle = std::unique_ptr<CURLM, MultiDeleter>;

constexpr std::size_t kMaxHeaders = 256;

void global_init_once() {
  // libcurl 7.88 is built thread-safe, but initialising once up front keeps start-up deterministic.
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

TransportError classify(CURLcode rc, bool body_overflow) {
  switch (rc) {
    case CURLE_OK:
      return TransportError::none;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      return TransportError::resolve;
    case CURLE_COULDNT_CONNECT:
      return TransportError::connect;
    case CURLE_OPERATION_TIMEDOUT:
      return TransportError::timeout;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
      return TransportError::tls;
    case CURLE_WRITE_ERROR:
      return body_overflow ? TransportError::body_too_large : TransportError::other;
    case CURLE_SEND_ERROR:
      return TransportError::send;
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
      return TransportError::receive;
    default:
      return TransportError::other;
  }
}

std::string trim(std::string_view s) {
  std::size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

}  // namespace

// One request in flight. Owned by Impl::transfers until curl reports it done.
struct Transfer {
  EasyHandle easy;
  HeaderList header_list;
  HttpRequest request;  // owns the body curl reads from (POSTFIELDS does not copy)
  HttpResponse response;
  HttpEngine::Callback done;
  bool body_overflow = false;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  char error_buffer[CURL_ERROR_SIZE] = {0};
};

// One socket curl asked us to watch. The descriptor wraps curl's own fd: curl owns and closes it,
// so on CURL_POLL_REMOVE (which curl sends before it closes the fd) we release() it — deregistering
// it from Asio's reactor without closing it. Pending waits then complete with operation_aborted.
struct SocketWatch {
  SocketWatch(asio::io_context& io, curl_socket_t fd) : descriptor(io, fd), fd(fd) {}
  asio::posix::stream_descriptor descriptor;
  curl_socket_t fd;
  int wanted = 0;  // CURL_POLL_IN / CURL_POLL_OUT bits
  bool read_pending = false;
  bool write_pending = false;
  bool removed = false;
};

struct HttpEngine::Impl {
  explicit Impl(asio::io_context& io) : io(io), timer(io) {
    global_init_once();
    multi.reset(curl_multi_init());
    if (!multi) throw std::runtime_error("libcurl: curl_multi_init failed (out of memory?)");
    curl_multi_setopt(multi.get(), CURLMOPT_SOCKETFUNCTION, &Impl::on_socket);
    curl_multi_setopt(multi.get(), CURLMOPT_SOCKETDATA, this);
    curl_multi_setopt(multi.get(), CURLMOPT_TIMERFUNCTION, &Impl::on_timer);
    curl_multi_setopt(multi.get(), CURLMOPT_TIMERDATA, this);
    // Bounded parallelism per host; further requests queue inside curl.
    curl_multi_setopt(multi.get(), CURLMOPT_MAX_HOST_CONNECTIONS, 8L);
  }

  ~Impl() {
    alive.reset();
    for (auto& [easy, transfer] : transfers) curl_multi_remove_handle(multi.get(), easy);
    transfers.clear();
    // curl_multi_cleanup closes cached connections and may call on_socket(REMOVE) while doing so:
    // this object must still be intact here.
    multi.reset();
    for (auto& [fd, watch] : sockets) {
      watch->removed = true;
      watch->descriptor.release();  // curl has closed (or will close) the fd; never close it twice
    }
    sockets.clear();
  }

  static int on_socket(CURL* /*easy*/, curl_socket_t fd, int what, void* userp, void* /*socketp*/) {
    auto* self = static_cast<Impl*>(userp);
    if (what == CURL_POLL_REMOVE) {
      self->forget(fd);
      return 0;
    }
    std::shared_ptr<SocketWatch> watch;
    if (auto it = self->sockets.find(fd); it != self->sockets.end()) {
      watch = it->second;
    } else {
      try {
        watch = std::make_shared<SocketWatch>(self->io, fd);
      } catch (const std::exception& e) {
        spdlog::error("unicore http: cannot watch socket {} with Asio: {}", fd, e.what());
        return -1;  // curl aborts the transfer using this socket
      }
      self->sockets.emplace(fd, watch);
    }
    watch->wanted = what & (CURL_POLL_IN | CURL_POLL_OUT);
    self->arm(watch);
    return 0;
  }

  static int on_timer(CURLM* /*multi*/, long timeout_ms, void* userp) {
    auto* self = static_cast<Impl*>(userp);
    if (timeout_ms < 0) {
      self->timer.cancel();
      return 0;
    }
    // Even a 0 ms timeout goes through the loop: curl forbids calling socket_action from here.
    self->timer.expires_after(std::chrono::milliseconds(timeout_ms));
    self->timer.async_wait(
        [self, alive = std::weak_ptr<bool>(self->alive)](const boost::system::error_code& ec) {
          if (ec || alive.expired()) return;
          self->socket_action(CURL_SOCKET_TIMEOUT, 0);
        });
    return 0;
  }

  void forget(curl_socket_t fd) {
    auto it = sockets.find(fd);
    if (it == sockets.end()) return;
    auto watch = it->second;
    sockets.erase(it);
    watch->removed = true;
    watch->descriptor.release();  // cancels our waits; curl closes the fd itself
  }

  void arm(const std::shared_ptr<SocketWatch>& watch) {
    if ((watch->wanted & CURL_POLL_IN) && !watch->read_pending) {
      watch->read_pending = true;
      watch->descriptor.async_wait(
          asio::posix::stream_descriptor::wait_read,
          [this, watch, alive = std::weak_ptr<bool>(alive)](const boost::system::error_code& ec) {
            watch->read_pending = false;
            on_ready(alive, watch, ec, CURL_CSELECT_IN);
          });
    }
    if ((watch->wanted & CURL_POLL_OUT) && !watch->write_pending) {
      watch->write_pending = true;
      watch->descriptor.async_wait(
          asio::posix::stream_descriptor::wait_write,
          [this, watch, alive = std::weak_ptr<bool>(alive)](const boost::system::error_code& ec) {
            watch->write_pending = false;
            on_ready(alive, watch, ec, CURL_CSELECT_OUT);
          });
    }
  }

  void on_ready(const std::weak_ptr<bool>& alive_token, const std::shared_ptr<SocketWatch>& watch,
                const boost::system::error_code& ec, int direction) {
    if (alive_token.expired() || watch->removed || ec == asio::error::operation_aborted) return;
    socket_action(watch->fd, ec ? CURL_CSELECT_ERR : direction);
    // curl may have removed the socket or changed what it wants during socket_action.
    if (!watch->removed) arm(watch);
  }

  void socket_action(curl_socket_t fd, int events) {
    int running = 0;
    CURLMcode rc = curl_multi_socket_action(multi.get(), fd, events, &running);
    if (rc != CURLM_OK)
      spdlog::error("unicore http: curl_multi_socket_action: {}", curl_multi_strerror(rc));
    collect_finished();
  }

  void collect_finished() {
    int left = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi.get(), &left)) {
      if (msg->msg != CURLMSG_DONE) continue;
      CURL* easy = msg->easy_handle;
      CURLcode rc = msg->data.result;  // read before remove_handle invalidates msg
      auto node = transfers.extract(easy);
      curl_multi_remove_handle(multi.get(), easy);
      if (node.empty()) continue;
      finish(std::move(node.mapped()), rc);
    }
  }

  void finish(std::unique_ptr<Transfer> t, CURLcode rc) {
    HttpResponse& r = t->response;
    long status = 0;
    curl_easy_getinfo(t->easy.get(), CURLINFO_RESPONSE_CODE, &status);
    long request_size = 0;
    curl_easy_getinfo(t->easy.get(), CURLINFO_REQUEST_SIZE, &request_size);
    r.status = status;
    r.request_sent = request_size > 0;
    r.error = classify(rc, t->body_overflow);
    if (r.error != TransportError::none) {
      r.error_message = t->error_buffer[0] ? std::string(t->error_buffer) : curl_easy_strerror(rc);
      if (r.error == TransportError::body_too_large) {
        r.error_message =
            "reply body larger than " + std::to_string(t->request.max_body) + " bytes";
      }
    }
    r.elapsed = std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - t->started);
    spdlog::debug("unicore http: {} {} -> {} ({}) in {} ms", t->request.method, t->request.url,
                  r.status, r.error == TransportError::none ? "ok" : r.error_message,
                  r.elapsed.count() / 1000);
    deliver(std::move(t->done), std::move(r));
  }

  void deliver(Callback done, HttpResponse response) {
    asio::post(io, [alive = std::weak_ptr<bool>(alive), done = std::move(done),
                    response = std::move(response)]() mutable {
      if (alive.expired()) return;
      done(std::move(response));
    });
  }

  static std::size_t on_header(char* data, std::size_t size, std::size_t count, void* userp) {
    auto* t = static_cast<Transfer*>(userp);
    std::size_t n = size * count;
    std::string_view line(data, n);
    if (line.rfind("HTTP/", 0) == 0) {
      t->response.headers.clear();  // a new response (after 100 Continue or an auth round)
      return n;
    }
    auto colon = line.find(':');
    if (colon == std::string_view::npos || t->response.headers.size() >= kMaxHeaders) return n;
    std::string name = trim(line.substr(0, colon));
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    t->response.headers.emplace_back(std::move(name), trim(line.substr(colon + 1)));
    return n;
  }

  static std::size_t on_body(char* data, std::size_t size, std::size_t count, void* userp) {
    auto* t = static_cast<Transfer*>(userp);
    std::size_t n = size * count;
    if (t->response.body.size() + n > t->request.max_body) {
      t->body_overflow = true;
      return 0;  // makes curl abort with CURLE_WRITE_ERROR; memory stays bounded
    }
    t->response.body.append(data, n);
    return n;
  }

  void start(HttpRequest request, Callback done) {
    auto t = std::make_unique<Transfer>();
    t->request = std::move(request);
    t->done = std::move(done);
    t->easy.reset(curl_easy_init());
    if (!t->easy) return fail_now(std::move(t), "curl_easy_init failed (out of memory?)");
    CURL* e = t->easy.get();
    const HttpRequest& rq = t->request;

    bool ok = true;
    auto set = [&](CURLoption opt, auto value) {
      if (curl_easy_setopt(e, opt, value) != CURLE_OK) ok = false;
    };
    set(CURLOPT_URL, rq.url.c_str());
    set(CURLOPT_PRIVATE, static_cast<void*>(t.get()));
    set(CURLOPT_ERRORBUFFER, t->error_buffer);
    set(CURLOPT_NOSIGNAL, 1L);
    set(CURLOPT_PROTOCOLS_STR, "http,https");
    // HTTP/1.1 like every UNICORE client; curl would otherwise try h2 over TLS.
    set(CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
    set(CURLOPT_FOLLOWLOCATION, 0L);  // never carry credentials to a redirect target
    set(CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(rq.connect_timeout.count()));
    set(CURLOPT_TIMEOUT_MS, static_cast<long>(rq.total_timeout.count()));
    set(CURLOPT_TCP_KEEPALIVE, 1L);
    if (rq.fresh_connection) set(CURLOPT_FRESH_CONNECT, 1L);
    set(CURLOPT_SSL_VERIFYPEER, rq.tls.verify ? 1L : 0L);
    set(CURLOPT_SSL_VERIFYHOST, rq.tls.verify ? 2L : 0L);
    if (!rq.tls.ca_file.empty()) set(CURLOPT_CAINFO, rq.tls.ca_file.c_str());
    set(CURLOPT_HEADERFUNCTION, &Impl::on_header);
    set(CURLOPT_HEADERDATA, static_cast<void*>(t.get()));
    set(CURLOPT_WRITEFUNCTION, &Impl::on_body);
    set(CURLOPT_WRITEDATA, static_cast<void*>(t.get()));

    if (rq.method == "GET") {
      set(CURLOPT_HTTPGET, 1L);
    } else if (rq.method == "POST") {
      set(CURLOPT_POST, 1L);
    } else if (rq.method == "PUT" || rq.method == "DELETE") {
      set(CURLOPT_CUSTOMREQUEST, rq.method.c_str());
    } else {
      return fail_now(std::move(t), "unsupported HTTP method " + rq.method);
    }
    if (rq.send_body || rq.method == "POST") {
      set(CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(rq.body.size()));
      set(CURLOPT_POSTFIELDS, rq.body.data());
    }

    curl_slist* list = nullptr;
    auto append = [&](const std::string& h) {
      curl_slist* next = curl_slist_append(list, h.c_str());
      if (!next)
        ok = false;
      else
        list = next;
    };
    for (const auto& h : rq.headers) append(h);
    // No "Expect: 100-continue" round trip for large uploads; UNICORE answers errors anyway.
    append("Expect:");
    t->header_list.reset(list);
    set(CURLOPT_HTTPHEADER, list);
    if (!ok) return fail_now(std::move(t), "could not configure the request for " + rq.url);

    CURLMcode mrc = curl_multi_add_handle(multi.get(), e);
    if (mrc != CURLM_OK) {
      return fail_now(std::move(t),
                      std::string("curl_multi_add_handle: ") + curl_multi_strerror(mrc));
    }
    transfers.emplace(e, std::move(t));
  }

  void fail_now(std::unique_ptr<Transfer> t, std::string why) {
    t->response.error = TransportError::other;
    t->response.error_message = std::move(why);
    deliver(std::move(t->done), std::move(t->response));
  }

  asio::io_context& io;
  asio::steady_timer timer;
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);
  std::unordered_map<curl_socket_t, std::shared_ptr<SocketWatch>> sockets;
  std::unordered_map<CURL*, std::unique_ptr<Transfer>> transfers;
  MultiHandle multi;
};

HttpEngine::HttpEngine(asio::io_context& io) : impl_(std::make_unique<Impl>(io)) {}
HttpEngine::~HttpEngine() = default;

void HttpEngine::start(HttpRequest request, Callback done) {
  impl_->start(std::move(request), std::move(done));
}

std::size_t HttpEngine::in_flight() const {
  return impl_->transfers.size();
}

}  // namespace kb::unicore
