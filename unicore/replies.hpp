#pragma once
// What the UNICORE REST API answers (core info, job lists and properties, file listings, errors),
// parsed defensively: any malformed, incomplete or oversized reply becomes an UnicoreError of kind
// bad_reply that names the URL and what was wrong.
// Also the mapping from HTTP failures to UnicoreError. Pure functions;
// any thread.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "unicore/http_engine.hpp"
#include "unicore/result.hpp"

namespace kb::unicore {

enum class JobStatus {
  undefined,
  ready,
  stagingin,
  queued,
  running,
  stagingout,
  successful,
  failed
};
const char* to_string(JobStatus status);  // the server's spelling, e.g. "RUNNING"
std::optional<JobStatus> parse_job_status(std::string_view text);
bool is_terminal(JobStatus status);  // SUCCESSFUL or FAILED

struct CoreInfo {
  std::string dn;
  std::string uid;
  std::vector<std::string> available_uids;
  std::string group;
  std::vector<std::string> available_groups;  // = the HPC projects the user may charge
  std::string role;
  std::vector<std::string> available_roles;
  std::string authentication_method;  // empty on servers older than ~9.2
  std::string server_version;
  std::string site_name;
  std::optional<std::string> selected_queue;
  std::vector<std::string> queues;  // empty when the site does not publish them
  bool job_submission_enabled = true;
  std::string job_submission_message;
  std::string jobs_url;      // from _links, may be empty
  std::string storages_url;  // from _links, may be empty
};

struct JobInfo {
  std::string url;
  JobStatus status = JobStatus::undefined;
  std::string status_message;
  std::optional<int> exit_code;  // the server sends a string, present only once known
  std::string batch_system_id;   // "N/A" before the batch system accepted the job
  std::string queue;
  std::string name;
  std::vector<std::string> tags;
  std::string submission_time;  // yyyy-MM-dd'T'HH:mm:ssZ as the server wrote it
  std::string termination_time;
  std::string working_directory;  // storage URL of the job directory (_links.workingDirectory)
  std::string details_url;

  // What a person reads when the job ended badly: the site's statusMessage, or a plain sentence.
  std::string failure_reason() const;
};

struct JobDetails {
  bool available = false;    // false when the site has no batch details yet ("rawDetailsData")
  std::string batch_job_id;  // JobId
  std::string job_state;     // JobState
  std::string batch_host;    // BatchHost
  std::string node_list;     // NodeList as sent (compressed)
  std::vector<std::string> nodes;          // NodeList expanded
  std::map<std::string, std::string> raw;  // every key, values as text
};

struct FileEntry {
  std::string path;
  bool is_directory = false;
  std::uint64_t size = 0;
};

struct FileInfo {
  std::string path;
  bool is_directory = false;
  std::uint64_t size = 0;
  std::string owner;
  std::string permissions;
  std::string last_accessed;
  std::vector<FileEntry> content;  // directories only, sorted by path
};

struct JobListPage {
  std::vector<std::string> jobs;    // job URLs
  std::optional<std::string> next;  // _links.next.href
};

// Parses a JSON reply body. Refuses bodies nested deeper than `max_depth` (a hostile "[[[[…" must
// not exhaust the stack) and says what the body looked like when it is not JSON (e.g. an HTML
// page).
Result<nlohmann::json> parse_json_reply(const HttpResponse& response, const std::string& url,
                                        int max_depth = 64);

Result<CoreInfo> parse_core_info(const nlohmann::json& j, const std::string& url);
Result<JobInfo> parse_job(const nlohmann::json& j, const std::string& url);
Result<JobDetails> parse_job_details(const nlohmann::json& j, const std::string& url);
Result<FileInfo> parse_file_info(const nlohmann::json& j, const std::string& url);
Result<JobListPage> parse_job_list(const nlohmann::json& j, const std::string& url);

// The site's own words for an error reply: "errorMessage" from a UNICORE error body, else a short,
// printable summary of whatever came back (e.g. the <title> of an HTML page). Empty for an empty
// body.
std::string server_message(const HttpResponse& response);
// True when the body is a UNICORE error document ({"errorMessage": …}).
bool is_unicore_error_body(const HttpResponse& response);

struct RequestContext {
  std::string method;
  std::string url;
  std::string site;         // the site's base URL, named in every error
  std::string credentials;  // Credentials::describe()
  int attempts = 1;
  bool is_submit = false;
};
// Maps a failed exchange (transport error or non-2xx status) to an UnicoreError a person can act
// on.
UnicoreError error_from_response(const HttpResponse& response, const RequestContext& context);

UnicoreError bad_reply(const std::string& url, const std::string& what);

}  // namespace kb::unicore
