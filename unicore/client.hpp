#pragma once
// The UNICORE/X REST client: discovery, jobs, job details, the files of a job's working directory
// (the part of the API it uses is what tests/unicore_site implements). Asynchronous on the caller's
// io_context (libcurl multi driven by Asio); every result arrives as a Result<T> in a callback,
// never as an exception.
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "unicore/credentials.hpp"
#include "unicore/http_engine.hpp"
#include "unicore/job_description.hpp"
#include "unicore/replies.hpp"
#include "unicore/result.hpp"
#include "unicore/retry.hpp"

namespace kb::unicore {

struct ClientOptions {
  std::string base_url;  // https://<gateway>/<SITE>/rest/core
  TlsOptions tls;        // verify=false is for test sites only and is logged as a warning
  std::chrono::milliseconds connect_timeout{10'000};
  std::chrono::milliseconds request_timeout{60'000};    // whole exchange, JSON requests
  std::chrono::milliseconds transfer_timeout{300'000};  // whole exchange, downloads and uploads
  std::size_t max_json_body = std::size_t{16} << 20;
  std::size_t max_download_body = std::size_t{256} << 20;
  RetryPolicy retry;
  GpuMode gpu_mode = GpuMode::gpus_per_node;
  // Seed of the retry delays' jitter. Unset: kb::backoff_seed() (replayable via KB_BACKOFF_SEED).
  std::optional<std::uint64_t> jitter_seed;
  std::size_t max_listed_jobs = 10'000;  // list_jobs stops following pages here
};

// Asked when a site refuses credentials (401/403). Given the refused credentials, it answers — now
// or later, on the io_context's thread — with fresh ones (the request is retried once with them) or
// nullopt (the request fails with ErrorKind::refused).
using RefreshHook = std::function<void(const Credentials& refused,
                                       std::function<void(std::optional<Credentials>)> reply)>;

struct ListJobsQuery {
  std::vector<std::string> tags;  // only jobs carrying all of these tags
  std::size_t offset = 0;
  std::size_t page_size = 200;  // "num" per request; further pages follow _links.next
};

struct Download {
  std::string bytes;
  bool partial = false;                     // 206: the server honoured the range
  std::optional<std::uint64_t> total_size;  // from Content-Range, when partial
};

struct ByteRange {
  std::uint64_t first = 0;
  std::optional<std::uint64_t> last;  // inclusive; nullopt = to the end
};

// Who may call: only the thread running the io_context given to the constructor (the bridge's event
// loop, or the CLI's own). Callbacks run on that thread. Destroying the client drops the callbacks
// of operations still in flight (they are never called).
class UnicoreClient {
 public:
  template <class T>
  using Callback = std::function<void(Result<T>)>;

  // Throws std::invalid_argument (configuration) when base_url is not an http(s) URL.
  UnicoreClient(boost::asio::io_context& io, ClientOptions options);
  ~UnicoreClient();
  UnicoreClient(const UnicoreClient&) = delete;
  UnicoreClient& operator=(const UnicoreClient&) = delete;

  const std::string& base_url() const { return options_.base_url; }
  const ClientOptions& options() const { return options_; }
  void set_refresh_hook(RefreshHook hook) { refresh_hook_ = std::move(hook); }

  // GET BASE. A reply with role "anonymous" is ErrorKind::refused ("authentication failed").
  void get_core_info(const Credentials& creds, Callback<CoreInfo> done);

  // POST BASE/jobs → the new job's URL (from Location). With have_client_stage_in the job waits
  // for uploads and start().
  void submit(const Credentials& creds, const JobDescription& job, Callback<std::string> done);
  void start(const Credentials& creds, const std::string& job, Callback<Done> done);
  void abort(const Credentials& creds, const std::string& job, Callback<Done> done);
  // DELETE: aborts the job and deletes its working directory.
  void remove(const Credentials& creds, const std::string& job, Callback<Done> done);

  // GET the job's properties; `fields` limits the reply (e.g.
  // {"status","statusMessage","exitCode"}).
  void get_job(const Credentials& creds, const std::string& job, Callback<JobInfo> done,
               std::vector<std::string> fields = {});
  void get_details(const Credentials& creds, const std::string& job, Callback<JobDetails> done);
  // Job URLs, following the site's paging up to options().max_listed_jobs.
  void list_jobs(const Credentials& creds, ListJobsQuery query,
                 Callback<std::vector<std::string>> done);

  // Files in a storage (normally a job's working directory, JobInfo::working_directory). `path` is
  // relative to the storage root; "" or "/" is the root.
  void stat(const Credentials& creds, const std::string& storage, const std::string& path,
            Callback<FileInfo> done);
  void download(const Credentials& creds, const std::string& storage, const std::string& path,
                std::optional<ByteRange> range, Callback<Download> done,
                std::optional<std::size_t> max_bytes = std::nullopt);
  void upload(const Credentials& creds, const std::string& storage, const std::string& path,
              std::string bytes, Callback<Done> done);

  // A job id or a full job URL → the job URL. Full URLs must belong to this site (same scheme, host
  // and port): credentials are never sent anywhere else.
  Result<std::string> job_url(const std::string& id_or_url) const;
  // The storage URL of a job's working directory: its workingDirectory link, else
  // BASE/storages/<id>-uspace.
  std::string working_directory(const JobInfo& job) const;

  // Exposed for tests and the CLI's --json output.
  Result<std::string> file_url(const std::string& storage, const std::string& path) const;
  std::size_t stored_sessions() const { return sessions_.size(); }

 private:
  struct Call;
  struct CallState;
  struct Session {
    std::string id;
    std::optional<std::chrono::steady_clock::time_point> expires;
  };

  void execute(Call call, const Credentials& creds, Callback<HttpResponse> done);
  void attempt(std::shared_ptr<CallState> state);
  void on_response(std::shared_ptr<CallState> state, HttpResponse response);
  void finish_error(const std::shared_ptr<CallState>& state, const HttpResponse& response);
  void get_json(const Credentials& creds, const std::string& url, Callback<nlohmann::json> done);
  void post_action(const Credentials& creds, const std::string& job, const std::string& action,
                   Callback<Done> done);
  void list_page(const Credentials& creds, std::string url,
                 std::shared_ptr<std::vector<std::string>> acc,
                 Callback<std::vector<std::string>> done);
  Result<std::string> same_site(const std::string& url, const char* what) const;
  std::string session_key(const Credentials& creds) const;
  void remember_session(const std::string& key, const HttpResponse& response);

  boost::asio::io_context& io_;
  ClientOptions options_;
  std::string origin_;  // scheme://host[:port] of base_url
  HttpEngine engine_;
  RefreshHook refresh_hook_;
  kb::Backoff retry_backoff_;  // options_.retry's delays; each request counts its own failures
  std::string session_salt_;
  std::unordered_map<std::string, Session> sessions_;  // per credentials (keyed by a salted hash)
  std::vector<std::weak_ptr<boost::asio::steady_timer>>
      backoff_timers_;  // cancelled on destruction
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kb::unicore
