#include "unicore/replies.hpp"

#include <gtest/gtest.h>

namespace kb::unicore {
namespace {

using nlohmann::json;

HttpResponse reply(long status, std::string body, std::string content_type = "application/json") {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  if (!content_type.empty()) r.headers.emplace_back("content-type", content_type);
  return r;
}

const std::string kUrl = "https://gw.example/SITE/rest/core";

TEST(Replies, CoreInfoFromTheReferenceShape) {
  json j = json::parse(R"({
    "client":{"dn":"CN=demouser,O=Test","xlogin":{"UID":"demouser","availableUIDs":["demouser"],
      "group":"users","availableGroups":["users","proj1"],"selectedSupplementaryGroups":[]},
      "role":{"selected":"user","availableRoles":["user"]},
      "queues":{"selected":"batch","availableQueues":["batch","gpus"]},
      "authenticationMethod":"PASSWORD_FILE"},
    "server":{"version":"10.1.0","siteName":"DEMO-SITE","jobSubmission":{"enabled":false,"message":"maintenance"}},
    "_links":{"jobs":{"href":"https://gw.example/SITE/rest/core/jobs"}}})");
  auto info = parse_core_info(j, kUrl);
  ASSERT_TRUE(info.ok()) << info.error().message;
  EXPECT_EQ(info->uid, "demouser");
  EXPECT_EQ(info->available_groups, (std::vector<std::string>{"users", "proj1"}));
  EXPECT_EQ(info->group, "users");
  EXPECT_EQ(info->role, "user");
  EXPECT_EQ(info->server_version, "10.1.0");
  EXPECT_EQ(info->site_name, "DEMO-SITE");
  EXPECT_EQ(info->queues, (std::vector<std::string>{"batch", "gpus"}));
  EXPECT_EQ(info->selected_queue, "batch");
  EXPECT_FALSE(info->job_submission_enabled);
  EXPECT_EQ(info->job_submission_message, "maintenance");
  EXPECT_EQ(info->authentication_method, "PASSWORD_FILE");
  EXPECT_EQ(info->jobs_url, "https://gw.example/SITE/rest/core/jobs");
}

TEST(Replies, CoreInfoWithoutClientIsABadReply) {
  auto info = parse_core_info(json::parse(R"({"server":{}})"), kUrl);
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.error().kind, ErrorKind::bad_reply);
  EXPECT_NE(info.error().message.find(kUrl), std::string::npos);
  EXPECT_NE(info.error().message.find("client"), std::string::npos);
}

TEST(Replies, JobPropertiesWithStringExitCodeAndLinks) {
  json j = json::parse(R"({"status":"FAILED","statusMessage":"Job aborted.","exitCode":"137",
    "queue":"batch","batchSystemID":"8017847","name":"k","tags":["jupyter"],
    "submissionTime":"2024-05-02T10:11:12+0200",
    "_links":{"workingDirectory":{"href":"https://gw/SITE/rest/core/storages/x-uspace"}}})");
  auto job = parse_job(j, kUrl + "/jobs/x");
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->status, JobStatus::failed);
  EXPECT_EQ(job->exit_code, 137);
  EXPECT_EQ(job->failure_reason(), "Job aborted.");
  EXPECT_EQ(job->batch_system_id, "8017847");
  EXPECT_EQ(job->tags, std::vector<std::string>{"jupyter"});
  EXPECT_EQ(job->working_directory, "https://gw/SITE/rest/core/storages/x-uspace");
  EXPECT_TRUE(is_terminal(job->status));
}

TEST(Replies, ExitCodeAbsentOrNotANumber) {
  auto a = parse_job(json::parse(R"({"status":"RUNNING"})"), kUrl);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->exit_code, std::nullopt);
  auto b = parse_job(json::parse(R"({"status":"SUCCESSFUL","exitCode":"n/a"})"), kUrl);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->exit_code, std::nullopt);
  auto c = parse_job(json::parse(R"({"status":"SUCCESSFUL","exitCode":0})"), kUrl);
  EXPECT_EQ(c->exit_code, 0);
}

TEST(Replies, FailedJobWithoutMessageStillHasAReason) {
  auto j = parse_job(json::parse(R"({"status":"FAILED"})"), kUrl);
  ASSERT_TRUE(j.ok());
  EXPECT_FALSE(j->failure_reason().empty());
}

TEST(Replies, MissingOrUnknownStatusIsABadReply) {
  auto missing = parse_job(json::parse(R"({"statusMessage":"x"})"), kUrl);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("\"status\""), std::string::npos);
  auto unknown = parse_job(json::parse(R"({"status":"EXPLODED"})"), kUrl);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message.find("EXPLODED"), std::string::npos);
  auto wrong_type = parse_job(json::parse(R"({"status":5})"), kUrl);
  ASSERT_FALSE(wrong_type.ok());
}

TEST(Replies, DetailsExpandTheNodeList) {
  auto d = parse_job_details(json::parse(R"({"JobId":"8017847","JobState":"RUNNING",
    "NodeList":"jrc[0025-0026,0030]","BatchHost":"jrc0025","NumNodes":"3"})"),
                             kUrl);
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_TRUE(d->available);
  EXPECT_EQ(d->batch_job_id, "8017847");
  EXPECT_EQ(d->job_state, "RUNNING");
  EXPECT_EQ(d->batch_host, "jrc0025");
  EXPECT_EQ(d->nodes, (std::vector<std::string>{"jrc0025", "jrc0026", "jrc0030"}));
  EXPECT_EQ(d->raw.at("NumNodes"), "3");
}

TEST(Replies, DetailsBeforeTheBatchSystemKnowsTheJob) {
  auto d = parse_job_details(json::parse(R"({"rawDetailsData":"N/A"})"), kUrl);
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(d->available);
  auto pending = parse_job_details(json::parse(R"j({"JobId":"1","NodeList":"(null)"})j"), kUrl);
  ASSERT_TRUE(pending.ok());
  EXPECT_TRUE(pending->nodes.empty());
  auto bad = parse_job_details(json::parse(R"({"JobId":"1","NodeList":"n[1-"})"), kUrl);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().kind, ErrorKind::bad_reply);
}

TEST(Replies, DirectoryListing) {
  auto f = parse_file_info(json::parse(R"({"isDirectory":true,"size":4096,"permissions":"rwx------",
    "content":{"/stdout":{"isDirectory":false,"size":123},"/sub/":{"isDirectory":true,"size":0}}})"),
                           kUrl);
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(f->is_directory);
  ASSERT_EQ(f->content.size(), 2u);
  EXPECT_EQ(f->content[0].path, "/stdout");
  EXPECT_EQ(f->content[0].size, 123u);
  EXPECT_TRUE(f->content[1].is_directory);
  auto bad = parse_file_info(json::parse(R"({"size":1})"), kUrl);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("isDirectory"), std::string::npos);
}

TEST(Replies, JobListWithNextPage) {
  auto p =
      parse_job_list(json::parse(R"({"jobs":["u1","u2"],"_links":{"next":{"href":"n"}}})"), kUrl);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->jobs.size(), 2u);
  EXPECT_EQ(p->next, "n");
  EXPECT_FALSE(parse_job_list(json::parse(R"({"jobs":[1]})"), kUrl).ok());
  EXPECT_FALSE(parse_job_list(json::parse(R"({})"), kUrl).ok());
}

TEST(Replies, HtmlInsteadOfJsonIsNamed) {
  auto j = parse_json_reply(
      reply(200, "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            "text/html"),
      kUrl);
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.error().kind, ErrorKind::bad_reply);
  EXPECT_NE(j.error().message.find("HTML"), std::string::npos);
  EXPECT_NE(j.error().message.find("502 Bad Gateway"), std::string::npos);
  EXPECT_NE(j.error().message.find(kUrl), std::string::npos);
}

TEST(Replies, GarbageTruncatedEmptyAndDeepJsonAreBadReplies) {
  for (std::string body : {std::string("this is not json"), std::string(R"({"status":"RUNN)"),
                           std::string(""), std::string("[1,2]"), std::string(100000, '[')}) {
    auto j = parse_json_reply(reply(200, body), kUrl);
    ASSERT_FALSE(j.ok()) << body.substr(0, 20);
    EXPECT_EQ(j.error().kind, ErrorKind::bad_reply);
    EXPECT_NE(j.error().message.find(kUrl), std::string::npos);
  }
}

RequestContext ctx(std::string method = "GET", bool submit = false) {
  return RequestContext{method, kUrl + "/jobs", kUrl, "a bearer token", 1, submit};
}

TEST(Replies, RefusedCredentialsNameTheSiteAndKeepTheServerMessage) {
  auto e = error_from_response(
      reply(
          403,
          R"({"errorMessage":"Authentication failed - credentials could not be verified.","status":403})"),
      ctx());
  EXPECT_EQ(e.kind, ErrorKind::refused);
  EXPECT_EQ(e.http_status, 403);
  EXPECT_EQ(e.server_message, "Authentication failed - credentials could not be verified.");
  EXPECT_NE(e.message.find("refused"), std::string::npos);
  EXPECT_NE(e.message.find(kUrl), std::string::npos);
  EXPECT_NE(e.message.find(e.server_message), std::string::npos);
  EXPECT_EQ(error_from_response(reply(401, ""), ctx()).kind, ErrorKind::refused);
}

TEST(Replies, StatusMapping) {
  EXPECT_EQ(
      error_from_response(reply(404, R"({"errorMessage":"no such job","status":404})"), ctx()).kind,
      ErrorKind::not_found);
  auto disabled = error_from_response(
      reply(503, R"({"errorMessage":"Job submission is disabled","status":503})"),
      ctx("POST", true));
  EXPECT_EQ(disabled.kind, ErrorKind::submission_disabled);
  EXPECT_NE(disabled.message.find("Job submission is disabled"), std::string::npos);
  auto html503 = error_from_response(
      reply(503, "<html><title>Service Unavailable</title></html>", "text/html"),
      ctx("POST", true));
  EXPECT_EQ(html503.kind, ErrorKind::server);
  EXPECT_NE(html503.message.find("Service Unavailable"), std::string::npos);
  EXPECT_EQ(html503.server_message, "");  // not a UNICORE error document
  EXPECT_EQ(error_from_response(reply(500, "{}"), ctx()).kind, ErrorKind::server);
}

TEST(Replies, TransportErrors) {
  HttpResponse r;
  r.error = TransportError::connect;
  r.error_message = "Failed to connect to 127.0.0.1 port 1: Connection refused";
  auto e = error_from_response(r, ctx());
  EXPECT_EQ(e.kind, ErrorKind::connect);
  EXPECT_NE(e.message.find("Connection refused"), std::string::npos);
  EXPECT_NE(e.message.find(kUrl), std::string::npos);

  r.error = TransportError::timeout;
  r.request_sent = true;
  auto t = error_from_response(r, ctx("POST", true));
  EXPECT_EQ(t.kind, ErrorKind::timeout);
  EXPECT_NE(t.message.find("may have been created"), std::string::npos);

  r.error = TransportError::body_too_large;
  r.error_message = "reply body larger than 16777216 bytes";
  EXPECT_EQ(error_from_response(r, ctx()).kind, ErrorKind::bad_reply);

  r.error = TransportError::tls;
  auto tls = error_from_response(r, ctx());
  EXPECT_EQ(tls.kind, ErrorKind::tls);
  EXPECT_NE(tls.message.find("ca-file"), std::string::npos);
}

TEST(Replies, JobStatusNamesRoundTrip) {
  for (auto s :
       {JobStatus::undefined, JobStatus::ready, JobStatus::stagingin, JobStatus::queued,
        JobStatus::running, JobStatus::stagingout, JobStatus::successful, JobStatus::failed}) {
    EXPECT_EQ(parse_job_status(to_string(s)), s);
  }
  EXPECT_EQ(parse_job_status("running"), std::nullopt);
}

}  // namespace
}  // namespace kb::unicore
