#include "unicore/replies.hpp"

#include <algorithm>
#include <cctype>

#include "common/text.hpp"
#include "unicore/hostlist.hpp"

namespace kb::unicore {

using nlohmann::json;

namespace {

constexpr std::size_t kSnippet = 160;

// A printable, single-line excerpt of arbitrary bytes for error messages.
std::string printable_snippet(std::string_view text, std::size_t max = kSnippet) {
  std::string out;
  bool space = false;
  for (unsigned char c : text) {
    if (out.size() >= max) {
      out += "…";
      break;
    }
    if (std::isspace(c)) {
      space = !out.empty();
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += (c < 0x20 || c >= 0x7f) ? '?' : static_cast<char>(c);
  }
  return out;
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

bool looks_like_html(const HttpResponse& r) {
  const std::string* ct = r.header("content-type");
  if (ct && lower(*ct).find("html") != std::string::npos) return true;
  std::string head = lower(std::string_view(r.body).substr(0, 64));
  auto start = head.find_first_not_of(" \t\r\n");
  return start != std::string::npos && head.compare(start, 1, "<") == 0;
}

std::string html_summary(const std::string& body) {
  std::string l = lower(std::string_view(body).substr(0, 65536));
  auto t = l.find("<title>");
  if (t != std::string::npos) {
    auto e = l.find("</title>", t);
    if (e != std::string::npos)
      return printable_snippet(std::string_view(body).substr(t + 7, e - t - 7));
  }
  // No title: the text without tags.
  std::string text;
  bool in_tag = false;
  for (char c : std::string_view(body).substr(0, 65536)) {
    if (c == '<')
      in_tag = true;
    else if (c == '>') {
      in_tag = false;
      text += ' ';
    } else if (!in_tag)
      text += c;
  }
  return printable_snippet(text);
}

const json* member(const json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

std::string text_of(const json* v) {
  if (!v || v->is_null()) return {};
  if (v->is_string()) return v->get<std::string>();
  if (v->is_boolean()) return v->get<bool>() ? "true" : "false";
  if (v->is_number_integer()) return std::to_string(v->get<long long>());
  if (v->is_number_unsigned()) return std::to_string(v->get<unsigned long long>());
  if (v->is_number()) return v->dump();
  return v->dump();
}

std::vector<std::string> strings_of(const json* v) {
  std::vector<std::string> out;
  if (!v) return out;
  if (v->is_array()) {
    for (const auto& e : *v) {
      if (e.is_string()) out.push_back(e.get<std::string>());
    }
  } else if (v->is_string()) {
    out.push_back(v->get<std::string>());
  }
  return out;
}

std::string href_of(const json& j, const char* link) {
  const json* links = member(j, "_links");
  const json* l = links ? member(*links, link) : nullptr;
  const json* href = l ? member(*l, "href") : nullptr;
  return href && href->is_string() ? href->get<std::string>() : std::string{};
}

std::optional<bool> bool_of(const json* v) {
  if (!v) return std::nullopt;
  if (v->is_boolean()) return v->get<bool>();
  if (v->is_string()) {
    std::string s = lower(v->get<std::string>());
    if (s == "true") return true;
    if (s == "false") return false;
  }
  return std::nullopt;
}

std::optional<std::uint64_t> size_of(const json* v) {
  if (!v) return std::nullopt;
  if (v->is_number_unsigned()) return v->get<std::uint64_t>();
  if (v->is_number_integer()) {
    long long n = v->get<long long>();
    if (n < 0) return std::nullopt;
    return static_cast<std::uint64_t>(n);
  }
  if (v->is_string()) {
    const std::string& s = v->get_ref<const std::string&>();
    if (s.empty() || s.size() > 19 || !std::all_of(s.begin(), s.end(), ::isdigit))
      return std::nullopt;
    return std::stoull(s);
  }
  return std::nullopt;
}

}  // namespace

const char* to_string(JobStatus status) {
  switch (status) {
    case JobStatus::undefined:
      return "UNDEFINED";
    case JobStatus::ready:
      return "READY";
    case JobStatus::stagingin:
      return "STAGINGIN";
    case JobStatus::queued:
      return "QUEUED";
    case JobStatus::running:
      return "RUNNING";
    case JobStatus::stagingout:
      return "STAGINGOUT";
    case JobStatus::successful:
      return "SUCCESSFUL";
    case JobStatus::failed:
      return "FAILED";
  }
  return "UNDEFINED";
}

std::optional<JobStatus> parse_job_status(std::string_view text) {
  for (JobStatus s :
       {JobStatus::undefined, JobStatus::ready, JobStatus::stagingin, JobStatus::queued,
        JobStatus::running, JobStatus::stagingout, JobStatus::successful, JobStatus::failed}) {
    if (text == to_string(s)) return s;
  }
  return std::nullopt;
}

bool is_terminal(JobStatus status) {
  return status == JobStatus::successful || status == JobStatus::failed;
}

std::string JobInfo::failure_reason() const {
  if (!status_message.empty()) return status_message;
  if (status == JobStatus::failed) return "the job failed and the site gave no reason";
  if (exit_code && *exit_code != 0)
    return "the job ended with exit code " + std::to_string(*exit_code);
  return {};
}

UnicoreError bad_reply(const std::string& url, const std::string& what) {
  return UnicoreError{ErrorKind::bad_reply, 0, "bad reply from " + url + ": " + what, "", url};
}

Result<json> parse_json_reply(const HttpResponse& r, const std::string& url, int max_depth) {
  auto with_status = [&](UnicoreError e) {
    e.http_status = static_cast<int>(r.status);
    return e;
  };
  if (r.body.empty()) return with_status(bad_reply(url, "empty body where JSON was expected"));
  if (looks_like_html(r)) {
    return with_status(
        bad_reply(url, "an HTML page instead of JSON (\"" + html_summary(r.body) + "\")"));
  }
  if (!json_depth_within(r.body, static_cast<std::size_t>(max_depth))) {
    return with_status(
        bad_reply(url, "JSON nested deeper than " + std::to_string(max_depth) + " levels"));
  }
  json j = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    const std::string* ct = r.header("content-type");
    return with_status(bad_reply(url, "not valid JSON (" + std::to_string(r.body.size()) +
                                          " bytes" +
                                          (ct ? ", content-type " + *ct : std::string{}) +
                                          ", starting \"" + printable_snippet(r.body, 60) + "\")"));
  }
  if (!j.is_object())
    return with_status(
        bad_reply(url, "JSON " + std::string(j.type_name()) + " where an object was expected"));
  return j;
}

Result<CoreInfo> parse_core_info(const json& j, const std::string& url) {
  const json* client = member(j, "client");
  const json* server = member(j, "server");
  if (!client || !client->is_object())
    return bad_reply(url, "no \"client\" object (is this a UNICORE /rest/core URL?)");
  if (!server || !server->is_object())
    return bad_reply(url, "no \"server\" object (is this a UNICORE /rest/core URL?)");
  const json* role = member(*client, "role");
  const json* selected = role ? member(*role, "selected") : nullptr;
  if (!selected || !selected->is_string()) return bad_reply(url, "no \"client.role.selected\"");
  CoreInfo info;
  info.role = selected->get<std::string>();
  info.available_roles = strings_of(member(*role, "availableRoles"));
  info.dn = text_of(member(*client, "dn"));
  if (const json* x = member(*client, "xlogin")) {
    info.uid = text_of(member(*x, "UID"));
    info.available_uids = strings_of(member(*x, "availableUIDs"));
    info.group = text_of(member(*x, "group"));
    info.available_groups = strings_of(member(*x, "availableGroups"));
  }
  if (const json* q = member(*client, "queues")) {
    if (const json* s = member(*q, "selected"); s && s->is_string())
      info.selected_queue = s->get<std::string>();
    info.queues = strings_of(member(*q, "availableQueues"));
  }
  info.authentication_method = text_of(member(*client, "authenticationMethod"));
  info.server_version = text_of(member(*server, "version"));
  info.site_name = text_of(member(*server, "siteName"));
  if (const json* js = member(*server, "jobSubmission")) {
    if (auto enabled = bool_of(member(*js, "enabled"))) info.job_submission_enabled = *enabled;
    info.job_submission_message = text_of(member(*js, "message"));
  }
  info.jobs_url = href_of(j, "jobs");
  info.storages_url = href_of(j, "storages");
  return info;
}

Result<JobInfo> parse_job(const json& j, const std::string& url) {
  const json* status = member(j, "status");
  if (!status || !status->is_string())
    return bad_reply(url, "no \"status\" in the job's properties");
  auto parsed = parse_job_status(status->get<std::string>());
  if (!parsed)
    return bad_reply(
        url, "unknown job status \"" + printable_snippet(status->get<std::string>(), 40) + "\"");
  JobInfo info;
  info.url = url;
  info.status = *parsed;
  info.status_message = text_of(member(j, "statusMessage"));
  std::string exit = text_of(member(j, "exitCode"));
  if (!exit.empty()) {
    char* end = nullptr;
    long v = std::strtol(exit.c_str(), &end, 10);
    if (end && *end == '\0' && v >= -1000000 && v <= 1000000) info.exit_code = static_cast<int>(v);
  }
  info.batch_system_id = text_of(member(j, "batchSystemID"));
  info.queue = text_of(member(j, "queue"));
  info.name = text_of(member(j, "name"));
  info.tags = strings_of(member(j, "tags"));
  info.submission_time = text_of(member(j, "submissionTime"));
  info.termination_time = text_of(member(j, "terminationTime"));
  info.working_directory = href_of(j, "workingDirectory");
  info.details_url = href_of(j, "details");
  return info;
}

Result<JobDetails> parse_job_details(const json& j, const std::string& url) {
  JobDetails d;
  for (const auto& [key, value] : j.items()) d.raw[key] = text_of(&value);
  if (d.raw.size() == 1 && d.raw.count("rawDetailsData"))
    return d;  // nothing from the batch system yet
  d.available = true;
  d.batch_job_id = text_of(member(j, "JobId"));
  d.job_state = text_of(member(j, "JobState"));
  d.batch_host = text_of(member(j, "BatchHost"));
  d.node_list = text_of(member(j, "NodeList"));
  // Slurm prints these for jobs that have no nodes yet.
  if (!d.node_list.empty() && d.node_list != "(null)" && d.node_list != "None assigned" &&
      d.node_list != "N/A") {
    auto nodes = expand_hostlist(d.node_list);
    if (!nodes) return bad_reply(url, nodes.error().message);
    d.nodes = std::move(nodes.value());
  }
  return d;
}

Result<FileInfo> parse_file_info(const json& j, const std::string& url) {
  auto is_dir = bool_of(member(j, "isDirectory"));
  if (!is_dir) return bad_reply(url, "no \"isDirectory\" in the file's properties");
  FileInfo f;
  f.is_directory = *is_dir;
  f.path = text_of(member(j, "path"));
  if (auto size = size_of(member(j, "size"))) f.size = *size;
  f.owner = text_of(member(j, "owner"));
  f.permissions = text_of(member(j, "permissions"));
  f.last_accessed = text_of(member(j, "lastAccessed"));
  if (const json* content = member(j, "content")) {
    if (!content->is_object()) return bad_reply(url, "\"content\" is not an object");
    for (const auto& [path, props] : content->items()) {
      auto dir = bool_of(member(props, "isDirectory"));
      if (!dir)
        return bad_reply(
            url, "directory entry \"" + printable_snippet(path, 80) + "\" has no \"isDirectory\"");
      FileEntry e;
      e.path = path;
      e.is_directory = *dir;
      if (auto size = size_of(member(props, "size"))) e.size = *size;
      f.content.push_back(std::move(e));
    }
    std::sort(f.content.begin(), f.content.end(),
              [](const FileEntry& a, const FileEntry& b) { return a.path < b.path; });
  }
  return f;
}

Result<JobListPage> parse_job_list(const json& j, const std::string& url) {
  const json* jobs = member(j, "jobs");
  if (!jobs || !jobs->is_array()) return bad_reply(url, "no \"jobs\" list");
  JobListPage page;
  for (const auto& e : *jobs) {
    if (!e.is_string()) return bad_reply(url, "a \"jobs\" entry is not a URL string");
    page.jobs.push_back(e.get<std::string>());
  }
  std::string next = href_of(j, "next");
  if (!next.empty()) page.next = next;
  return page;
}

bool is_unicore_error_body(const HttpResponse& r) {
  if (r.body.empty() || r.body.size() > (1u << 20) || r.body.front() != '{') return false;
  if (!json_depth_within(r.body, 16)) return false;
  json j = json::parse(r.body, nullptr, false);
  const json* m = j.is_discarded() ? nullptr : member(j, "errorMessage");
  return m && m->is_string();
}

std::string server_message(const HttpResponse& r) {
  if (r.body.empty()) return {};
  if (is_unicore_error_body(r)) {
    json j = json::parse(r.body, nullptr, false);
    return j["errorMessage"].get<std::string>();
  }
  if (looks_like_html(r)) return "an HTML page: \"" + html_summary(r.body) + "\"";
  return "\"" + printable_snippet(r.body) + "\"";
}

UnicoreError error_from_response(const HttpResponse& r, const RequestContext& c) {
  UnicoreError e;
  e.url = c.url;
  e.http_status = static_cast<int>(r.status);
  std::string tries = c.attempts > 1 ? " (after " + std::to_string(c.attempts) + " attempts)" : "";
  switch (r.error) {
    case TransportError::none:
      break;
    case TransportError::resolve:
    case TransportError::connect:
      e.kind = ErrorKind::connect;
      e.message = "cannot reach UNICORE site " + c.site + tries + ": " + r.error_message +
                  "; check the site URL and that the site is up";
      return e;
    case TransportError::tls:
      e.kind = ErrorKind::tls;
      e.message =
          "TLS with UNICORE site " + c.site + " failed: " + r.error_message +
          "; if the site uses its own CA, give its certificate bundle (--ca-file / ca_file)";
      return e;
    case TransportError::timeout:
      e.kind = ErrorKind::timeout;
      e.message = "UNICORE site " + c.site + " did not answer " + c.method + " " + c.url +
                  " in time" + tries + ": " + r.error_message;
      if (c.is_submit && r.request_sent) {
        e.message +=
            "; the job may have been created anyway — list your jobs before submitting again";
      }
      return e;
    case TransportError::body_too_large:
      e.kind = ErrorKind::bad_reply;
      e.message =
          "bad reply from " + c.url + ": " + r.error_message + " (the limit protects memory)";
      return e;
    case TransportError::send:
    case TransportError::receive:
    case TransportError::other:
      e.kind = ErrorKind::connect;
      e.message = "connection to UNICORE site " + c.site + " failed during " + c.method + " " +
                  c.url + tries + ": " + r.error_message;
      if (c.is_submit && r.request_sent) {
        e.message +=
            "; the job may have been created anyway — list your jobs before submitting again";
      }
      return e;
  }

  e.server_message = is_unicore_error_body(r) ? server_message(r) : std::string{};
  std::string said = server_message(r);
  std::string status = "HTTP " + std::to_string(r.status);
  std::string detail = said.empty() ? status : status + ": " + said;
  if (r.status == 401 || r.status == 403) {
    e.kind = ErrorKind::refused;
    e.message = "credentials refused by UNICORE site " + c.site + " (" + detail + "); " +
                c.credentials + " was not accepted — supply a valid (fresh) token or password";
  } else if (r.status == 404) {
    e.kind = ErrorKind::not_found;
    e.message = "not found at UNICORE site " + c.site + ": " + c.url + " (" + detail + ")";
  } else if (r.status == 503 && c.is_submit && is_unicore_error_body(r)) {
    e.kind = ErrorKind::submission_disabled;
    e.message = "UNICORE site " + c.site + " does not accept jobs now (" + detail + ")";
  } else if (r.status >= 200 && r.status < 300) {
    e.kind = ErrorKind::bad_reply;
    e.message = "bad reply from " + c.url + ": unexpected " + status;
  } else {
    e.kind = ErrorKind::server;
    e.message = "UNICORE site " + c.site + " answered " + c.method + " " + c.url + " with " +
                detail + tries;
  }
  return e;
}

const char* to_string(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::refused:
      return "refused";
    case ErrorKind::not_found:
      return "not_found";
    case ErrorKind::server:
      return "server";
    case ErrorKind::timeout:
      return "timeout";
    case ErrorKind::connect:
      return "connect";
    case ErrorKind::tls:
      return "tls";
    case ErrorKind::bad_reply:
      return "bad_reply";
    case ErrorKind::submission_disabled:
      return "submission_disabled";
    case ErrorKind::invalid_argument:
      return "invalid_argument";
    case ErrorKind::cancelled:
      return "cancelled";
  }
  return "server";
}

}  // namespace kb::unicore
