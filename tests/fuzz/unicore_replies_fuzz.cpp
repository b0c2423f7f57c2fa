// libFuzzer target: what the UNICORE client makes of a server's reply (unicore/replies.cpp and the
// host lists it expands, unicore/hostlist.cpp). The first byte chooses the reply's HTTP status and
// content type (and, for one value in eight, hands the rest to expand_hostlist() as a NodeList);
// the rest is the body. The body goes through parse_json_reply() as UnicoreClient::get_json() does,
// then through every parser the client uses on a JSON reply (core info, job properties, job
// details, file properties, job list pages), and through the error path (server_message,
// error_from_response) a non-2xx reply takes.
// Invariants (unicore/replies.hpp, unicore/result.hpp): never an exception or a crash, every
// failure is an UnicoreError of kind bad_reply naming the URL, host lists stay within their limit
// and hold no empty name, parsed values are what the types promise.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "unicore/hostlist.hpp"
#include "unicore/replies.hpp"

namespace {

using namespace kb::unicore;

const std::string kUrl = "https://unicore.example:8080/DEMO-SITE/rest/core/jobs/j-1";

[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "unicore_replies_fuzz: invariant broken: %s\n", what);
  std::abort();
}

template <class T>
void check_error(const Result<T>& r, const std::string& url) {
  if (r.ok()) return;
  const UnicoreError& e = r.error();
  if (e.kind != ErrorKind::bad_reply) broken("a parser failed with a kind other than bad_reply");
  if (e.message.find(url) == std::string::npos) broken("a bad reply does not name its URL");
}

void check_hosts(const std::vector<std::string>& hosts, std::size_t max_hosts) {
  if (hosts.size() > max_hosts) broken("more hosts than the limit");
  for (const auto& h : hosts) {
    if (h.empty()) broken("an empty host name");
  }
}

void parse_all(const nlohmann::json& j) {
  if (!j.is_object()) broken("parse_json_reply accepted a JSON value that is not an object");
  auto core = parse_core_info(j, kUrl);
  check_error(core, kUrl);

  auto job = parse_job(j, kUrl);
  check_error(job, kUrl);
  if (job) {
    if (parse_job_status(to_string(job->status)) != job->status) broken("status round trip");
    (void)job->failure_reason();
  }

  auto details = parse_job_details(j, kUrl);
  check_error(details, kUrl);
  if (details) check_hosts(details->nodes, 65536);

  auto file = parse_file_info(j, kUrl);
  check_error(file, kUrl);
  if (file &&
      !std::is_sorted(file->content.begin(), file->content.end(),
                      [](const FileEntry& a, const FileEntry& b) { return a.path < b.path; }))
    broken("directory entries not sorted");

  auto page = parse_job_list(j, kUrl);
  check_error(page, kUrl);
  if (page && page->next && page->next->empty()) broken("an empty next link");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t selector = data[0];
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);

  if (selector % 8 == 7) {  // the body as a Slurm NodeList, as parse_job_details meets it
    constexpr std::size_t kMaxHosts = 4096;
    auto hosts = expand_hostlist(body, kMaxHosts);
    if (hosts)
      check_hosts(*hosts, kMaxHosts);
    else if (hosts.error().kind != ErrorKind::bad_reply)
      broken("a host list error not bad_reply");
    return 0;
  }

  static const long kStatus[] = {200, 201, 401, 403, 404, 500, 502, 503};
  static const char* const kContentType[] = {"application/json", "", "text/html; charset=utf-8",
                                             "application/problem+json"};
  HttpResponse r;
  r.status = kStatus[(selector >> 3) % 8];
  if (const char* ct = kContentType[(selector >> 6) % 4]; *ct)
    r.headers.emplace_back("content-type", ct);
  r.body = body;

  auto j = parse_json_reply(r, kUrl);
  check_error(j, kUrl);
  if (j) parse_all(j.value());

  // The error path: what a person reads about a failed request.
  (void)is_unicore_error_body(r);
  (void)server_message(r);
  RequestContext context{"POST",
                         kUrl,
                         "https://unicore.example:8080/DEMO-SITE/rest/core",
                         "token for alice",
                         2,
                         selector % 2 == 0};
  const UnicoreError e = error_from_response(r, context);
  if (e.message.empty()) broken("an error without a message");
  if (e.http_status != r.status) broken("an error with another HTTP status");
  return 0;
}
