#include "unicore/client.hpp"

#include <spdlog/spdlog.h>

#include <boost/asio/post.hpp>

#include <algorithm>
#include <cctype>
#include <stdexcept>

#include "auth/secret.hpp"

namespace kb::unicore {

namespace asio = boost::asio;
using nlohmann::json;

namespace {

constexpr std::size_t kMaxSessions = 4096;
constexpr auto kSessionMargin = std::chrono::seconds(5);

std::string percent_encode(std::string_view s, bool keep_slash) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' ||
        (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (const auto& i : items) {
    if (!out.empty()) out.append(sep);
    out += i;
  }
  return out;
}

UnicoreError invalid_argument(std::string message) {
  return UnicoreError{ErrorKind::invalid_argument, 0, std::move(message), "", ""};
}

std::string last_segment(const std::string& url) {
  auto q = url.find_first_of("?#");
  std::string path = url.substr(0, q);
  while (!path.empty() && path.back() == '/') path.pop_back();
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::optional<std::uint64_t> content_range_total(const std::string* value) {
  // "bytes 0-99/1234"
  if (!value) return std::nullopt;
  auto slash = value->rfind('/');
  if (slash == std::string::npos) return std::nullopt;
  std::string total = value->substr(slash + 1);
  if (total.empty() || total.size() > 19 || !std::all_of(total.begin(), total.end(), ::isdigit)) {
    return std::nullopt;
  }
  return std::stoull(total);
}

}  // namespace

// One logical API request; attempt() turns it into HTTP requests (retries, 432, refresh).
struct UnicoreClient::Call {
  std::string method = "GET";
  std::string url;
  std::string body;
  bool send_body = false;
  std::string content_type;  // empty: no Content-Type header
  std::string accept = "application/json";
  std::vector<std::string> extra_headers;
  bool idempotent = true;
  bool is_submit = false;
  std::size_t max_body = 0;
  std::chrono::milliseconds timeout{0};
};

struct UnicoreClient::CallState {
  Call call;
  Credentials creds;
  Callback<HttpResponse> done;
  int attempts = 0;  // HTTP requests sent for this call so far
  int failures = 0;  // transient failures so far (drives the backoff)
  bool session_retried = false;
  bool refreshed = false;
  bool maybe_applied =
      false;  // an earlier attempt may have reached the server (DELETE → 404 is fine)
};

UnicoreClient::UnicoreClient(asio::io_context& io, ClientOptions options)
    : io_(io),
      options_(std::move(options)),
      engine_(io),
      retry_backoff_(options_.retry.backoff(),
                     options_.jitter_seed ? *options_.jitter_seed : kb::backoff_seed()) {
  std::string& base = options_.base_url;
  while (!base.empty() && base.back() == '/') base.pop_back();
  std::size_t scheme_end = base.find("://");
  std::string scheme = scheme_end == std::string::npos ? "" : base.substr(0, scheme_end);
  if (scheme != "http" && scheme != "https") {
    throw std::invalid_argument("UNICORE base URL '" + base +
                                "' must start with https:// (or http:// for a test site), e.g. "
                                "https://gateway.example.org/SITE/rest/core");
  }
  std::size_t host_end = base.find('/', scheme_end + 3);
  origin_ = base.substr(0, host_end);
  if (origin_.size() <= scheme_end + 3 || base.find_first_of("?# \t\r\n") != std::string::npos) {
    throw std::invalid_argument("UNICORE base URL '" + base +
                                "' has no host or contains ?, # or spaces");
  }
  if (options_.retry.max_attempts < 1) options_.retry.max_attempts = 1;
  auto salt = kb::auth::random_bytes(32);
  session_salt_.assign(salt.begin(), salt.end());
  if (!options_.tls.verify && scheme == "https") {
    spdlog::warn(
        "unicore: TLS VERIFICATION IS OFF for {} — anyone on the network path can read the tokens "
        "sent there; use this only with a test site",
        options_.base_url);
  }
}

UnicoreClient::~UnicoreClient() {
  alive_.reset();
  for (auto& weak : backoff_timers_) {
    if (auto timer = weak.lock()) timer->cancel();
  }
}

std::string UnicoreClient::session_key(const Credentials& creds) const {
  std::string material = creds.authorization() + "\n" + creds.preferences.header_value();
  auto salt = std::span<const std::uint8_t>(
      reinterpret_cast<const std::uint8_t*>(session_salt_.data()), session_salt_.size());
  auto data = std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(material.data()),
                                            material.size());
  auto digest = kb::auth::hmac_sha256(salt, data);
  return kb::auth::to_hex(digest);
}

void UnicoreClient::remember_session(const std::string& key, const HttpResponse& r) {
  const std::string* id = r.header("x-unicore-securitysession");
  if (!id || id->empty()) return;
  Session s{*id, std::nullopt};
  if (const std::string* lifetime = r.header("x-unicore-securitysession-lifetime")) {
    char* end = nullptr;
    long long ms = std::strtoll(lifetime->c_str(), &end, 10);
    if (end && *end == '\0' && ms > 0) {
      s.expires = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms) - kSessionMargin;
    }
  }
  if (sessions_.size() >= kMaxSessions && !sessions_.count(key)) {
    auto now = std::chrono::steady_clock::now();
    std::erase_if(sessions_,
                  [now](const auto& kv) { return kv.second.expires && *kv.second.expires < now; });
    if (sessions_.size() >= kMaxSessions) sessions_.erase(sessions_.begin());
  }
  sessions_[key] = std::move(s);
}

Result<std::string> UnicoreClient::same_site(const std::string& url, const char* what) const {
  if (url.size() >= origin_.size() && url.compare(0, origin_.size(), origin_) == 0 &&
      (url.size() == origin_.size() || url[origin_.size()] == '/')) {
    if (url.find_first_of(" \t\r\n") != std::string::npos) {
      return invalid_argument(std::string(what) + " '" + url + "' contains white space");
    }
    return url;
  }
  return invalid_argument(std::string(what) + " '" + url + "' is not on the UNICORE site " +
                          origin_ + "; credentials are only ever sent to the configured site");
}

Result<std::string> UnicoreClient::job_url(const std::string& id_or_url) const {
  if (id_or_url.find("://") != std::string::npos) {
    auto url = same_site(id_or_url, "job URL");
    if (!url) return url;
    std::string u = url.value();
    while (!u.empty() && u.back() == '/') u.pop_back();
    return u;
  }
  if (id_or_url.empty() || !std::all_of(id_or_url.begin(), id_or_url.end(), [](unsigned char c) {
        return std::isalnum(c) || c == '-' || c == '_' || c == '.';
      })) {
    return invalid_argument("'" + id_or_url +
                            "' is neither a job id (letters, digits, '-', '_', '.') nor a job URL");
  }
  return options_.base_url + "/jobs/" + id_or_url;
}

std::string UnicoreClient::working_directory(const JobInfo& job) const {
  if (!job.working_directory.empty()) return job.working_directory;
  return options_.base_url + "/storages/" + last_segment(job.url) + "-uspace";
}

Result<std::string> UnicoreClient::file_url(const std::string& storage,
                                            const std::string& path) const {
  auto s = same_site(storage, "storage URL");
  if (!s) return s;
  std::string base = s.value();
  while (!base.empty() && base.back() == '/') base.pop_back();
  std::string p = path;
  while (!p.empty() && p.front() == '/') p.erase(p.begin());
  for (unsigned char c : p) {
    if (c < 0x20 || c == 0x7f) return invalid_argument("file path contains a control character");
  }
  // ".." would be normalised away by the server or a proxy (RFC 3986 5.2.4) and the request, with
  // the user's token, would then reach a resource outside the job's storage: refuse it here.
  for (std::size_t start = 0; start <= p.size();) {
    const std::size_t end = std::min(p.find('/', start), p.size());
    const std::string_view segment(p.data() + start, end - start);
    if (segment == "..")
      return invalid_argument("file path '" + p + "' leaves the job's working directory ('..')");
    start = end + 1;
  }
  return base + "/files/" + percent_encode(p, /*keep_slash=*/true);
}

void UnicoreClient::execute(Call call, const Credentials& creds, Callback<HttpResponse> done) {
  if (std::string why = creds.validate(); !why.empty()) {
    auto e = invalid_argument("cannot use the credentials for " + options_.base_url + ": " + why);
    e.url = call.url;
    asio::post(io_, [done = std::move(done), e]() { done(e); });
    return;
  }
  if (call.max_body == 0) call.max_body = options_.max_json_body;
  if (call.timeout.count() == 0) call.timeout = options_.request_timeout;
  auto state = std::make_shared<CallState>();
  state->call = std::move(call);
  state->creds = creds;
  state->done = std::move(done);
  attempt(std::move(state));
}

void UnicoreClient::attempt(std::shared_ptr<CallState> state) {
  const Call& c = state->call;
  HttpRequest rq;
  rq.method = c.method;
  rq.url = c.url;
  rq.body = c.body;
  rq.send_body = c.send_body;
  rq.connect_timeout = options_.connect_timeout;
  rq.total_timeout = c.timeout;
  rq.max_body = c.max_body;
  rq.tls = options_.tls;
  rq.fresh_connection = !c.idempotent;
  rq.headers.push_back("Accept: " + c.accept);
  if (!c.content_type.empty()) rq.headers.push_back("Content-Type: " + c.content_type);
  if (std::string auth = state->creds.authorization(); !auth.empty()) {
    rq.headers.push_back("Authorization: " + auth);
  }
  if (!state->creds.preferences.empty()) {
    rq.headers.push_back("X-UNICORE-User-Preferences: " + state->creds.preferences.header_value());
  }
  std::string key = session_key(state->creds);
  if (auto it = sessions_.find(key); it != sessions_.end()) {
    if (it->second.expires && *it->second.expires < std::chrono::steady_clock::now()) {
      sessions_.erase(it);  // would only earn a 432
    } else {
      rq.headers.push_back("X-UNICORE-SecuritySession: " + it->second.id);
    }
  }
  rq.headers.push_back(std::string("User-Agent: kernel-bridge/") + KB_VERSION);
  for (const auto& h : c.extra_headers) rq.headers.push_back(h);
  ++state->attempts;
  engine_.start(std::move(rq), [this, alive = std::weak_ptr<bool>(alive_), state](HttpResponse r) {
    if (alive.expired()) return;
    on_response(state, std::move(r));
  });
}

void UnicoreClient::on_response(std::shared_ptr<CallState> state, HttpResponse r) {
  const Call& c = state->call;
  std::string key = session_key(state->creds);
  if (r.error == TransportError::none) remember_session(key, r);

  if (r.error == TransportError::none && r.status >= 200 && r.status < 300) {
    state->done(std::move(r));
    return;
  }
  if (r.error == TransportError::none && r.status == 432) {
    // The security session expired on the server: forget it and authenticate afresh, once.
    sessions_.erase(key);
    if (!state->session_retried) {
      state->session_retried = true;
      spdlog::debug("unicore: security session expired at {}; retrying {} without it",
                    options_.base_url, c.url);
      attempt(std::move(state));
      return;
    }
  }
  if (r.error == TransportError::none && (r.status == 401 || r.status == 403)) {
    sessions_.erase(key);
    if (refresh_hook_ && !state->refreshed) {
      state->refreshed = true;
      spdlog::info("unicore: {} refused {} ({}); asking for fresh credentials", options_.base_url,
                   state->creds.describe(), r.status);
      auto refused = std::make_shared<HttpResponse>(std::move(r));
      refresh_hook_(state->creds, [this, alive = std::weak_ptr<bool>(alive_), state,
                                   refused](std::optional<Credentials> fresh) {
        if (alive.expired()) return;
        if (!fresh) return finish_error(state, *refused);
        if (std::string why = fresh->validate(); !why.empty()) {
          spdlog::warn("unicore: refreshed credentials unusable: {}", why);
          return finish_error(state, *refused);
        }
        state->creds = std::move(*fresh);
        attempt(state);
      });
      return;
    }
  }
  if (r.error == TransportError::none && r.status == 404 && c.method == "DELETE" &&
      state->maybe_applied) {
    // An earlier DELETE probably went through before its answer was lost.
    r.status = 204;
    state->done(std::move(r));
    return;
  }

  bool unicore_body = r.error == TransportError::none && is_unicore_error_body(r);
  if (is_retryable(r, c.idempotent, unicore_body) &&
      state->failures + 1 < options_.retry.max_attempts) {
    ++state->failures;
    if (r.request_sent) state->maybe_applied = true;
    auto delay = retry_backoff_.delay(state->failures - 1);
    if (const std::string* after = r.header("retry-after")) {
      char* end = nullptr;
      long s = std::strtol(after->c_str(), &end, 10);
      if (end && *end == '\0' && s > 0) {
        // Honoured up to max_delay: a site asking for more gets the error sooner instead.
        delay = std::max(delay, std::min<std::chrono::milliseconds>(std::chrono::seconds(s),
                                                                    options_.retry.max_delay));
      }
    }
    spdlog::info(
        "unicore: {} {} failed ({}); retry {} of {} in {} ms", c.method, c.url,
        r.error == TransportError::none ? "HTTP " + std::to_string(r.status) : r.error_message,
        state->failures, options_.retry.max_attempts - 1, delay.count());
    auto timer = std::make_shared<asio::steady_timer>(io_, delay);
    std::erase_if(backoff_timers_, [](const auto& w) { return w.expired(); });
    backoff_timers_.push_back(timer);
    timer->async_wait([this, alive = std::weak_ptr<bool>(alive_), state,
                       timer](const boost::system::error_code& ec) {
      if (ec || alive.expired()) return;
      attempt(state);
    });
    return;
  }
  finish_error(state, r);
}

void UnicoreClient::finish_error(const std::shared_ptr<CallState>& state, const HttpResponse& r) {
  RequestContext ctx{state->call.method,      state->call.url, options_.base_url,
                     state->creds.describe(), state->attempts, state->call.is_submit};
  UnicoreError e = error_from_response(r, ctx);
  spdlog::debug("unicore: {}", e.message);  // the caller reports it, with its own context
  state->done(std::move(e));
}

void UnicoreClient::get_json(const Credentials& creds, const std::string& url,
                             Callback<json> done) {
  Call c;
  c.url = url;
  c.content_type = "application/json";  // pyunicore sends it on every JSON request (reference §2)
  execute(std::move(c), creds, [url, done = std::move(done)](Result<HttpResponse> r) {
    if (!r) return done(r.error());
    done(parse_json_reply(r.value(), url));
  });
}

void UnicoreClient::get_core_info(const Credentials& creds, Callback<CoreInfo> done) {
  std::string url = options_.base_url;
  get_json(creds, url, [this, url, creds, done = std::move(done)](Result<json> j) {
    if (!j) return done(j.error());
    auto info = parse_core_info(j.value(), url);
    if (!info) return done(info.error());
    if (info->role == "anonymous") {
      UnicoreError e{ErrorKind::refused, 200,
                     "authentication failed at UNICORE site " + options_.base_url +
                         ": the site treats the request as anonymous (" + creds.describe() +
                         " did not authenticate); supply a valid token or password",
                     "", url};
      return done(e);
    }
    done(std::move(info));
  });
}

void UnicoreClient::submit(const Credentials& creds, const JobDescription& job,
                           Callback<std::string> done) {
  auto body = job.to_json(options_.gpu_mode);
  if (!body) {
    asio::post(io_, [done = std::move(done), e = body.error()]() { done(e); });
    return;
  }
  Call c;
  c.method = "POST";
  c.url = options_.base_url + "/jobs";
  c.body = body->dump();
  c.send_body = true;
  c.content_type = "application/json";
  c.idempotent = false;
  c.is_submit = true;
  std::string url = c.url;
  execute(std::move(c), creds, [this, url, done = std::move(done)](Result<HttpResponse> r) {
    if (!r) return done(r.error());
    const std::string* location = r->header("location");
    if (r->status != 201 && r->status != 200) {
      return done(bad_reply(url, "HTTP " + std::to_string(r->status) + " instead of 201 Created"));
    }
    if (!location || location->empty())
      return done(bad_reply(url, "no Location header naming the new job"));
    std::string loc = *location;
    if (loc.front() == '/') loc = origin_ + loc;
    auto job_url = same_site(loc, "new job URL");
    if (!job_url) return done(bad_reply(url, job_url.error().message));
    spdlog::info("unicore: submitted job {}", job_url.value());
    done(std::move(job_url));
  });
}

void UnicoreClient::post_action(const Credentials& creds, const std::string& job,
                                const std::string& action, Callback<Done> done) {
  auto url = job_url(job);
  if (!url) {
    asio::post(io_, [done = std::move(done), e = url.error()]() { done(e); });
    return;
  }
  Call c;
  c.method = "POST";
  c.url = url.value() + "/actions/" + action;
  c.body = "{}";
  c.send_body = true;
  c.content_type = "application/json";
  c.idempotent = true;  // start/abort of the same job twice has the same effect as once
  execute(std::move(c), creds, [done = std::move(done)](Result<HttpResponse> r) {
    if (!r) return done(r.error());
    done(Done{});
  });
}

void UnicoreClient::start(const Credentials& creds, const std::string& job, Callback<Done> done) {
  post_action(creds, job, "start", std::move(done));
}

void UnicoreClient::abort(const Credentials& creds, const std::string& job, Callback<Done> done) {
  post_action(creds, job, "abort", std::move(done));
}

void UnicoreClient::remove(const Credentials& creds, const std::string& job, Callback<Done> done) {
  auto url = job_url(job);
  if (!url) {
    asio::post(io_, [done = std::move(done), e = url.error()]() { done(e); });
    return;
  }
  Call c;
  c.method = "DELETE";
  c.url = url.value();
  c.content_type = "application/json";
  execute(std::move(c), creds, [done = std::move(done)](Result<HttpResponse> r) {
    if (!r) return done(r.error());
    done(Done{});
  });
}

void UnicoreClient::get_job(const Credentials& creds, const std::string& job,
                            Callback<JobInfo> done, std::vector<std::string> fields) {
  auto url = job_url(job);
  if (!url) {
    asio::post(io_, [done = std::move(done), e = url.error()]() { done(e); });
    return;
  }
  std::string request_url = url.value();
  if (!fields.empty()) {
    std::vector<std::string> encoded;
    for (const auto& f : fields) encoded.push_back(percent_encode(f, false));
    request_url += "?fields=" + join(encoded, ",");
  }
  std::string job_url_value = url.value();
  get_json(creds, request_url,
           [job_url_value, request_url, done = std::move(done)](Result<json> j) {
             if (!j) return done(j.error());
             auto info = parse_job(j.value(), request_url);
             if (info) info->url = job_url_value;
             done(std::move(info));
           });
}

void UnicoreClient::get_details(const Credentials& creds, const std::string& job,
                                Callback<JobDetails> done) {
  auto url = job_url(job);
  if (!url) {
    asio::post(io_, [done = std::move(done), e = url.error()]() { done(e); });
    return;
  }
  std::string details = url.value() + "/details";
  get_json(creds, details, [details, done = std::move(done)](Result<json> j) {
    if (!j) return done(j.error());
    done(parse_job_details(j.value(), details));
  });
}

void UnicoreClient::list_jobs(const Credentials& creds, ListJobsQuery query,
                              Callback<std::vector<std::string>> done) {
  for (const auto& t : query.tags) {
    if (t.empty() || t.find(',') != std::string::npos) {
      auto e = invalid_argument("tag '" + t + "' is empty or contains ','");
      asio::post(io_, [done = std::move(done), e]() { done(e); });
      return;
    }
  }
  std::string url = options_.base_url + "/jobs?offset=" + std::to_string(query.offset) +
                    "&num=" + std::to_string(std::max<std::size_t>(1, query.page_size));
  if (!query.tags.empty()) {
    std::vector<std::string> encoded;
    for (const auto& t : query.tags) encoded.push_back(percent_encode(t, false));
    url += "&tags=" + join(encoded, ",");
  }
  list_page(creds, std::move(url), std::make_shared<std::vector<std::string>>(), std::move(done));
}

void UnicoreClient::list_page(const Credentials& creds, std::string url,
                              std::shared_ptr<std::vector<std::string>> acc,
                              Callback<std::vector<std::string>> done) {
  get_json(creds, url,
           [this, alive = std::weak_ptr<bool>(alive_), creds, url, acc,
            done = std::move(done)](Result<json> j) mutable {
             if (alive.expired()) return;
             if (!j) return done(j.error());
             auto page = parse_job_list(j.value(), url);
             if (!page) return done(page.error());
             for (auto& job : page->jobs) {
               if (acc->size() >= options_.max_listed_jobs) break;
               acc->push_back(std::move(job));
             }
             if (!page->next || page->jobs.empty() || acc->size() >= options_.max_listed_jobs) {
               return done(std::move(*acc));
             }
             auto next = same_site(*page->next, "next page URL");
             if (!next) return done(bad_reply(url, next.error().message));
             list_page(creds, next.value(), acc, std::move(done));
           });
}

void UnicoreClient::stat(const Credentials& creds, const std::string& storage,
                         const std::string& path, Callback<FileInfo> done) {
  auto url = file_url(storage, path);
  if (!url) {
    asio::post(io_, [done = std::move(done), e = url.error()]() { done(e); });
    return;
  }
  std::string u = url.value();
  get_json(creds, u, [u, done = std::move(done)](Result<json> j) {
    if (!j) return done(j.error());
    done(parse_file_info(j.value(), u));
  });
}

void UnicoreClient::download(const Credentials& creds, const std::string& storage,
                             const std::string& path, std::optional<ByteRange> range,
                             Callback<Download> done, std::optional<std::size_t> max_bytes) {
  auto url = file_url(storage, path);
  if (!url) {
    asio::post(io_, [done = std::move(done), e = url.error()]() { done(e); });
    return;
  }
  Call c;
  c.url = url.value();
  c.accept = "application/octet-stream";
  c.max_body = max_bytes.value_or(options_.max_download_body);
  c.timeout = options_.transfer_timeout;
  if (range) {
    if (range->last && *range->last < range->first) {
      auto e = invalid_argument("byte range ends before it starts");
      asio::post(io_, [done = std::move(done), e]() { done(e); });
      return;
    }
    c.extra_headers.push_back("Range: bytes=" + std::to_string(range->first) + "-" +
                              (range->last ? std::to_string(*range->last) : std::string{}));
  }
  execute(std::move(c), creds, [done = std::move(done)](Result<HttpResponse> r) {
    if (!r) return done(r.error());
    Download d;
    d.partial = r->status == 206;
    if (d.partial) d.total_size = content_range_total(r->header("content-range"));
    d.bytes = std::move(r->body);
    done(std::move(d));
  });
}

void UnicoreClient::upload(const Credentials& creds, const std::string& storage,
                           const std::string& path, std::string bytes, Callback<Done> done) {
  auto url = file_url(storage, path);
  if (!url || path.empty() || path == "/") {
    auto e = url ? invalid_argument("upload needs a file path, not the storage root") : url.error();
    asio::post(io_, [done = std::move(done), e]() { done(e); });
    return;
  }
  Call c;
  c.method = "PUT";
  c.url = url.value();
  c.body = std::move(bytes);
  c.send_body = true;
  // Never JSON here: a PUT with application/json modifies the file's properties instead (§5).
  c.content_type = "application/octet-stream";
  c.timeout = options_.transfer_timeout;
  execute(std::move(c), creds, [done = std::move(done)](Result<HttpResponse> r) {
    if (!r) return done(r.error());
    done(Done{});
  });
}

}  // namespace kb::unicore
