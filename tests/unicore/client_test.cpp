// The UNICORE client against the UNICORE-compatible test site: every call, the request bytes the
// site received, faults (503 bursts, 432, refused tokens, garbage replies, hangs, drops) and TLS.
#include "unicore/client.hpp"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <boost/asio/io_context.hpp>
#include <cerrno>
#include <fstream>
#include <set>
#include <thread>

#include "tests/unicore/site_fixture.hpp"
#include "unicore/job_watcher.hpp"

namespace kb::unicore {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using testing::TestSite;

std::string header(const json& request, std::string name) {
  auto lower = [](std::string s) {
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  for (const auto& [k, v] : request["headers"].items()) {
    if (lower(k) == lower(name)) return v.get<std::string>();
  }
  return "<absent>";
}

std::string b64(const std::string& s) {
  return base64_encode(s);
}

// A zombie (exited, not yet reaped by its new parent) counts as dead.
bool alive(int pid) {
  if (kill(pid, 0) != 0) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  auto close = line.rfind(')');
  return close == std::string::npos || line.size() < close + 3 || line[close + 2] != 'Z';
}

std::string job_id(const std::string& url) {
  return url.substr(url.rfind('/') + 1);
}

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override { site = std::make_unique<TestSite>(); }

  std::unique_ptr<UnicoreClient> client(std::function<void(ClientOptions&)> tweak = {}) {
    ClientOptions o;
    o.base_url = site->url();
    o.retry.initial_delay = 10ms;
    o.retry.max_delay = 50ms;
    o.jitter_seed = 1;
    o.request_timeout = 15s;
    if (tweak) tweak(o);
    return std::make_unique<UnicoreClient>(io, o);
  }

  // Runs the io_context until the operation started by `start` delivers its result.
  template <class T, class F>
  Result<T> wait(F&& start, std::chrono::seconds limit = 20s) {
    std::optional<Result<T>> out;
    start([&out](Result<T> r) { out.emplace(std::move(r)); });
    run_until([&] { return out.has_value(); }, limit);
    if (!out) {
      ADD_FAILURE() << "no result within " << limit.count() << " s";
      return UnicoreError{ErrorKind::cancelled, 0, "test timeout", "", ""};
    }
    return std::move(*out);
  }

  template <class Pred>
  void run_until(Pred done, std::chrono::seconds limit) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      if (io.stopped()) io.restart();
      io.run_one_for(50ms);
    }
  }

  // Follows the job with a JobWatcher (fast policy) until `until` holds for a status or the job
  // ends.
  std::vector<JobStatus> watch(UnicoreClient& c, const std::string& job,
                               std::function<bool(JobStatus)> until, JobInfo* last = nullptr,
                               std::chrono::seconds limit = 20s) {
    WatchPolicy p;
    p.starting_initial = p.queued_initial = p.running_initial = 50ms;
    p.starting_max = p.queued_max = p.running_max = 150ms;
    std::vector<JobStatus> seen;
    bool done = false;
    WatchHandlers h;
    h.on_change = [&](const JobInfo& j) {
      seen.push_back(j.status);
      if (last) *last = j;
      if (until(j.status)) done = true;
    };
    h.on_end = [&](const JobInfo& j) {
      if (last) *last = j;
      done = true;
    };
    h.on_error = [&](const UnicoreError& e, bool fatal) {
      ADD_FAILURE() << "watch error: " << e.message;
      if (fatal) done = true;
    };
    auto w = JobWatcher::create(c, io, alice, job, h, p);
    w->start();
    run_until([&] { return done; }, limit);
    w->stop();
    EXPECT_TRUE(done) << "job " << job << " did not reach the awaited status";
    return seen;
  }

  std::string submit(UnicoreClient& c, const JobDescription& d) {
    auto r = wait<std::string>([&](auto cb) { c.submit(alice, d, cb); });
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    return r.ok() ? r.value() : std::string{};
  }

  // Polls until the file exists in the job's directory (the job writes it after it starts).
  std::string read_file(UnicoreClient& c, const std::string& storage, const std::string& path) {
    for (int i = 0; i < 100; ++i) {
      auto d = wait<Download>([&](auto cb) { c.download(alice, storage, path, std::nullopt, cb); });
      if (d.ok()) return d->bytes;
      EXPECT_EQ(d.error().kind, ErrorKind::not_found) << d.error().message;
      if (d.error().kind != ErrorKind::not_found) break;
      auto t = std::make_shared<boost::asio::steady_timer>(io, 50ms);
      bool fired = false;
      t->async_wait([&](auto) { fired = true; });
      run_until([&] { return fired; }, 5s);
    }
    ADD_FAILURE() << path << " never appeared";
    return {};
  }

  boost::asio::io_context io;
  std::unique_ptr<TestSite> site;
  Credentials alice = Credentials::bearer("tok-alice");
};

TEST_F(ClientTest, CoreInfoForBearerBasicAndAnonymous) {
  auto c = client();
  auto info = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_TRUE(info.ok()) << info.error().message;
  EXPECT_EQ(info->uid, "alice");
  EXPECT_EQ(info->dn, "CN=alice,O=Test");
  EXPECT_EQ(info->role, "user");
  EXPECT_EQ(info->group, "users");
  EXPECT_EQ(info->available_groups, (std::vector<std::string>{"users", "proj1"}));
  EXPECT_EQ(info->site_name, "DEMO-SITE");
  EXPECT_EQ(info->server_version, "10.1.0");
  EXPECT_EQ(info->queues, (std::vector<std::string>{"batch", "gpus"}));
  EXPECT_TRUE(info->job_submission_enabled);
  EXPECT_FALSE(info->authentication_method.empty());

  auto basic = wait<CoreInfo>([&](auto cb) {
    c->get_core_info(Credentials::basic("bob", "bob-pw", *Preferences::parse("group:users")), cb);
  });
  ASSERT_TRUE(basic.ok()) << basic.error().message;
  EXPECT_EQ(basic->uid, "bob");

  auto anon = wait<CoreInfo>([&](auto cb) { c->get_core_info(Credentials::anonymous(), cb); });
  ASSERT_FALSE(anon.ok());
  EXPECT_EQ(anon.error().kind, ErrorKind::refused);
  EXPECT_NE(anon.error().message.find("authentication failed"), std::string::npos);
  EXPECT_NE(anon.error().message.find(site->url()), std::string::npos);

  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 3u);
  EXPECT_EQ(header(reqs[0], "Authorization"), "Bearer tok-alice");
  EXPECT_EQ(header(reqs[0], "Accept"), "application/json");
  EXPECT_EQ(header(reqs[0], "Content-Type"), "application/json");
  EXPECT_EQ(header(reqs[1], "Authorization"), "Basic " + b64("bob:bob-pw"));
  EXPECT_EQ(header(reqs[1], "X-UNICORE-User-Preferences"), "group:users");
  EXPECT_EQ(header(reqs[2], "Authorization"), "<absent>");
}

TEST_F(ClientTest, SubmitRunReadFilesDetailsListAndDelete) {
  auto c = client();
  JobDescription d;
  d.executable = "echo \"hello $GREETING\" > out.txt; mkdir sub; echo y > sub/y; sleep 30";
  d.environment["GREETING"] = "world";
  d.resources.queue = "batch";
  d.resources.runtime = "5min";
  d.name = "kb-test";
  d.tags = {"kb-submit-test"};
  auto pref = *Preferences::parse("uid:alice,group:proj1");
  Credentials alice_proj = Credentials::bearer("tok-alice", pref);
  auto submitted = wait<std::string>([&](auto cb) { c->submit(alice_proj, d, cb); });
  ASSERT_TRUE(submitted.ok()) << submitted.error().message;
  std::string job = submitted.value();
  EXPECT_EQ(job.rfind(site->url() + "/jobs/", 0), 0u) << job;

  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["method"], "POST");
  EXPECT_EQ(reqs[0]["path"], "/DEMO-SITE/rest/core/jobs");
  EXPECT_EQ(header(reqs[0], "Content-Type"), "application/json");
  EXPECT_EQ(header(reqs[0], "Accept"), "application/json");
  EXPECT_EQ(header(reqs[0], "X-UNICORE-User-Preferences"), "uid:alice,group:proj1");
  EXPECT_EQ(reqs[0]["body_b64"], b64(d.to_json(GpuMode::gpus_per_node)->dump()));

  JobInfo last;
  auto seen = watch(
      *c, job, [](JobStatus s) { return s == JobStatus::running; }, &last);
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back(), JobStatus::running);
  EXPECT_TRUE(std::find(seen.begin(), seen.end(), JobStatus::queued) != seen.end());

  // The watcher asked for only the fields it needs.
  for (const auto& r : site->take_requests()) {
    EXPECT_EQ(r["query"], "fields=status,statusMessage,exitCode");
  }

  auto info = wait<JobInfo>([&](auto cb) { c->get_job(alice, job, cb); });
  ASSERT_TRUE(info.ok()) << info.error().message;
  EXPECT_EQ(info->status, JobStatus::running);
  EXPECT_EQ(info->name, "kb-test");
  EXPECT_EQ(info->queue, "batch");
  EXPECT_EQ(info->tags, std::vector<std::string>{"kb-submit-test"});
  EXPECT_NE(info->batch_system_id, "N/A");
  std::string storage = c->working_directory(*info);
  EXPECT_EQ(storage, site->url() + "/storages/" + job_id(job) + "-uspace");

  EXPECT_EQ(read_file(*c, storage, "out.txt"), "hello world\n");
  (void)read_file(*c, storage, "sub/y");
  site->take_requests();
  auto part = wait<Download>([&](auto cb) {
    c->download(alice, storage, "/out.txt", ByteRange{0, 4}, cb);
  });
  ASSERT_TRUE(part.ok()) << part.error().message;
  EXPECT_EQ(part->bytes, "hello");
  EXPECT_TRUE(part->partial);
  EXPECT_EQ(part->total_size, 12u);
  reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(header(reqs[0], "Accept"), "application/octet-stream");
  EXPECT_EQ(header(reqs[0], "Range"), "bytes=0-4");

  auto root = wait<FileInfo>([&](auto cb) { c->stat(alice, storage, "", cb); });
  ASSERT_TRUE(root.ok()) << root.error().message;
  EXPECT_TRUE(root->is_directory);
  std::set<std::string> names;
  for (const auto& e : root->content) names.insert(e.path);
  EXPECT_TRUE(names.count("/out.txt")) << root->content.size();
  EXPECT_TRUE(names.count("/sub/"));
  auto file = wait<FileInfo>([&](auto cb) { c->stat(alice, storage, "out.txt", cb); });
  ASSERT_TRUE(file.ok());
  EXPECT_FALSE(file->is_directory);
  EXPECT_EQ(file->size, 12u);
  auto dir = wait<Download>([&](auto cb) { c->download(alice, storage, "sub", std::nullopt, cb); });
  ASSERT_FALSE(dir.ok());  // 406: a directory has no bytes
  EXPECT_EQ(dir.error().http_status, 406);

  auto details = wait<JobDetails>([&](auto cb) { c->get_details(alice, job, cb); });
  ASSERT_TRUE(details.ok()) << details.error().message;
  EXPECT_TRUE(details->available);
  EXPECT_EQ(details->batch_job_id, info->batch_system_id);
  EXPECT_EQ(details->job_state, "RUNNING");
  EXPECT_EQ(details->nodes, (std::vector<std::string>{"cn0007", "cn0008"}));
  EXPECT_EQ(details->batch_host, "cn0007");

  auto listed = wait<std::vector<std::string>>([&](auto cb) {
    c->list_jobs(alice, ListJobsQuery{{"kb-submit-test"}, 0, 200}, cb);
  });
  ASSERT_TRUE(listed.ok()) << listed.error().message;
  EXPECT_EQ(listed.value(), std::vector<std::string>{job});

  auto removed = wait<Done>([&](auto cb) { c->remove(alice, job, cb); });
  ASSERT_TRUE(removed.ok()) << removed.error().message;
  auto gone = wait<JobInfo>([&](auto cb) { c->get_job(alice, job, cb); });
  ASSERT_FALSE(gone.ok());
  EXPECT_EQ(gone.error().kind, ErrorKind::not_found);
  EXPECT_NE(gone.error().message.find(job), std::string::npos);
}

TEST_F(ClientTest, ListJobsFollowsPaging) {
  auto c = client();
  std::set<std::string> submitted;
  for (int i = 0; i < 3; ++i) {
    JobDescription d;
    d.executable = "true";
    d.tags = {"kb-paging"};
    submitted.insert(submit(*c, d));
  }
  site->take_requests();
  auto listed = wait<std::vector<std::string>>([&](auto cb) {
    c->list_jobs(alice, ListJobsQuery{{"kb-paging"}, 0, 2}, cb);
  });
  ASSERT_TRUE(listed.ok()) << listed.error().message;
  EXPECT_EQ(std::set<std::string>(listed->begin(), listed->end()), submitted);
  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 2u);  // two pages of at most 2
  EXPECT_EQ(reqs[0]["query"], "offset=0&num=2&tags=kb-paging");
}

TEST_F(ClientTest, ClientStageInUploadThenStart) {
  auto c = client();
  std::string bytes;
  for (int i = 0; i < 256; ++i) bytes += static_cast<char>(i);
  bytes += std::string(100000, 'z');
  JobDescription d;
  d.executable = "bash script.sh";
  d.have_client_stage_in = true;
  std::string job = submit(*c, d);
  ASSERT_FALSE(job.empty());
  auto before = wait<JobInfo>([&](auto cb) { c->get_job(alice, job, cb); });
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(before->status, JobStatus::ready);  // waits for our files
  std::string storage = c->working_directory(*before);
  site->take_requests();

  auto up1 = wait<Done>([&](auto cb) { c->upload(alice, storage, "in/data.bin", bytes, cb); });
  ASSERT_TRUE(up1.ok()) << up1.error().message;
  auto up2 = wait<Done>(
      [&](auto cb) { c->upload(alice, storage, "script.sh", "cp in/data.bin copy.bin\n", cb); });
  ASSERT_TRUE(up2.ok()) << up2.error().message;
  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 2u);
  EXPECT_EQ(reqs[0]["method"], "PUT");
  EXPECT_EQ(reqs[0]["path"],
            "/DEMO-SITE/rest/core/storages/" + job_id(job) + "-uspace/files/in/data.bin");
  EXPECT_EQ(header(reqs[0], "Content-Type"), "application/octet-stream");
  EXPECT_EQ(reqs[0]["body_b64"], b64(bytes));

  auto started = wait<Done>([&](auto cb) { c->start(alice, job, cb); });
  ASSERT_TRUE(started.ok()) << started.error().message;
  reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0]["path"], "/DEMO-SITE/rest/core/jobs/" + job_id(job) + "/actions/start");
  EXPECT_EQ(reqs[0]["body_b64"], b64("{}"));
  EXPECT_EQ(header(reqs[0], "Content-Type"), "application/json");

  JobInfo last;
  watch(
      *c, job, [](JobStatus) { return false; }, &last);
  EXPECT_EQ(last.status, JobStatus::successful) << last.status_message;
  EXPECT_EQ(last.exit_code, 0);
  auto copy =
      wait<Download>([&](auto cb) { c->download(alice, storage, "copy.bin", std::nullopt, cb); });
  ASSERT_TRUE(copy.ok()) << copy.error().message;
  EXPECT_EQ(copy->bytes, bytes);
}

TEST_F(ClientTest, AbortKillsTheJobsProcesses) {
  auto c = client();
  JobDescription d;
  d.executable = "sleep 300 & echo $! > child.pid; sleep 300";
  std::string job = submit(*c, d);
  watch(*c, job, [](JobStatus s) { return s == JobStatus::running; });
  auto info = wait<JobInfo>([&](auto cb) { c->get_job(alice, job, cb); });
  ASSERT_TRUE(info.ok());
  int child = std::stoi(read_file(*c, c->working_directory(*info), "child.pid"));
  json ctl = site->job(job_id(job));
  int pid = ctl["pid"].get<int>();
  ASSERT_GT(pid, 1);
  ASSERT_EQ(kill(pid, 0), 0) << "job process should be alive";
  ASSERT_EQ(kill(child, 0), 0) << "job's child should be alive";

  auto aborted = wait<Done>([&](auto cb) { c->abort(alice, job, cb); });
  ASSERT_TRUE(aborted.ok()) << aborted.error().message;
  JobInfo last;
  watch(
      *c, job, [](JobStatus) { return false; }, &last);
  EXPECT_EQ(last.status, JobStatus::failed);
  EXPECT_EQ(last.failure_reason(), "Job aborted.");
  // The site kills the whole process group: TERM, then KILL after its grace (1 s here).
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while ((alive(pid) || alive(child)) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_FALSE(alive(pid)) << "the job's process survived the abort";
  EXPECT_FALSE(alive(child)) << "the job's child process survived the abort";
}

TEST_F(ClientTest, RuntimeExpiryEndsTheJobFailedWithTheTimeLimitReason) {
  auto c = client();
  JobDescription d;
  d.executable = "sleep 60";
  d.resources.runtime = "1";
  std::string job = submit(*c, d);
  JobInfo last;
  watch(
      *c, job, [](JobStatus) { return false; }, &last);
  EXPECT_EQ(last.status, JobStatus::failed);
  EXPECT_NE(last.failure_reason().find("TIME LIMIT"), std::string::npos) << last.failure_reason();
}

TEST_F(ClientTest, RefusedTokenNamesTheSiteAndARefreshedTokenRecovers) {
  auto c = client();
  auto bad =
      wait<CoreInfo>([&](auto cb) { c->get_core_info(Credentials::bearer("tok-wrong"), cb); });
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().kind, ErrorKind::refused);
  EXPECT_EQ(bad.error().http_status, 403);
  EXPECT_NE(bad.error().message.find("refused"), std::string::npos);
  EXPECT_NE(bad.error().message.find(site->url()), std::string::npos) << bad.error().message;
  EXPECT_FALSE(bad.error().server_message.empty());
  EXPECT_NE(bad.error().message.find(bad.error().server_message), std::string::npos);
  EXPECT_EQ(bad.error().message.find("tok-wrong"), std::string::npos)
      << "secret in an error message";

  // A session exists for tok-alice; then the token expires (sessions too) and a new one is issued.
  ASSERT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
  site->faults({{"expire_token", "tok-alice"},
                {"expire_sessions", true},
                {"add_token", {{"uid", "alice"}, {"token", "tok-alice-2"}}}});
  site->take_requests();
  std::vector<std::string> asked;
  c->set_refresh_hook(
      [&](const Credentials& old, std::function<void(std::optional<Credentials>)> reply) {
        asked.push_back(old.token);
        reply(Credentials::bearer("tok-alice-2"));
      });
  auto again = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(again->uid, "alice");
  EXPECT_EQ(asked, std::vector<std::string>{"tok-alice"});
  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 3u);
  EXPECT_NE(header(reqs[0], "X-UNICORE-SecuritySession"), "<absent>");  // old session → 432
  EXPECT_EQ(header(reqs[1], "X-UNICORE-SecuritySession"), "<absent>");  // dropped
  EXPECT_EQ(header(reqs[1], "Authorization"), "Bearer tok-alice");      // → 403
  EXPECT_EQ(header(reqs[2], "Authorization"), "Bearer tok-alice-2");    // refreshed → 200

  // A hook with nothing better: the refusal is reported, after exactly one try.
  c->set_refresh_hook(
      [&](const Credentials&, std::function<void(std::optional<Credentials>)> reply) {
        asked.push_back("none");
        reply(std::nullopt);
      });
  auto refused =
      wait<CoreInfo>([&](auto cb) { c->get_core_info(Credentials::bearer("tok-alice"), cb); });
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().kind, ErrorKind::refused);
  EXPECT_EQ(asked.back(), "none");
}

TEST_F(ClientTest, ServiceUnavailableBurstIsRiddenOutAndALongerOneIsAClearError) {
  auto c = client([](ClientOptions& o) { o.retry.max_attempts = 4; });
  site->faults({{"fail_next", {{"count", 3}, {"status", 503}}}});
  auto ok = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_EQ(site->take_requests().size(), 4u);

  site->faults({{"fail_next", {{"count", 10}, {"status", 503}}}});
  auto fail = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_FALSE(fail.ok());
  EXPECT_EQ(fail.error().kind, ErrorKind::server);
  EXPECT_EQ(fail.error().http_status, 503);
  EXPECT_NE(fail.error().message.find("503"), std::string::npos);
  EXPECT_NE(fail.error().message.find("4 attempts"), std::string::npos) << fail.error().message;
  EXPECT_EQ(site->take_requests().size(), 4u);
  site->reset();  // the rest of the burst; this also ends the sessions, so make a new one first
  ASSERT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
  site->take_requests();

  JobDescription d;
  d.executable = "true";
  // A proxy's 503 page: UNICORE never saw the submission, so it is repeated.
  site->faults({{"fail_next",
                 {{"count", 1},
                  {"status", 503},
                  {"content_type", "text/html"},
                  {"body", "<html><title>Service Unavailable</title></html>"}}}});
  EXPECT_FALSE(submit(*c, d).empty());
  auto posts = site->take_requests();
  EXPECT_EQ(posts.size(), 2u) << posts.dump(1);
  // A 500 after sending may have created the job: not repeated.
  site->faults({{"fail_next", {{"count", 1}, {"status", 500}}}});
  auto five = wait<std::string>([&](auto cb) { c->submit(alice, d, cb); });
  ASSERT_FALSE(five.ok());
  EXPECT_EQ(five.error().kind, ErrorKind::server);
  EXPECT_EQ(site->take_requests().size(), 1u);
  // The connection drops after the submission was sent: it may have created a job, so it is not
  // repeated (neither by us nor silently by curl) and the error says to look before resubmitting.
  site->faults({{"garbage_next", {{"kind", "drop"}, {"match", "/jobs"}}}});
  auto dropped = wait<std::string>([&](auto cb) { c->submit(alice, d, cb); });
  ASSERT_FALSE(dropped.ok());
  EXPECT_EQ(dropped.error().kind, ErrorKind::connect);
  EXPECT_NE(dropped.error().message.find("may have been created"), std::string::npos)
      << dropped.error().message;
  EXPECT_EQ(site->take_requests().size(), 1u);
  // Submission switched off by the site: reported at once with the site's words.
  site->faults({{"submission_enabled", false}});
  auto off = wait<std::string>([&](auto cb) { c->submit(alice, d, cb); });
  ASSERT_FALSE(off.ok());
  EXPECT_EQ(off.error().kind, ErrorKind::submission_disabled);
  EXPECT_FALSE(off.error().server_message.empty());
  EXPECT_EQ(site->take_requests().size(), 1u);
  auto info = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->job_submission_enabled);
}

TEST_F(ClientTest, SecuritySessionIsReusedAndRenewedAfter432) {
  auto c = client();
  ASSERT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
  ASSERT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 2u);
  EXPECT_EQ(header(reqs[0], "X-UNICORE-SecuritySession"), "<absent>");
  std::string first = header(reqs[1], "X-UNICORE-SecuritySession");
  EXPECT_NE(first, "<absent>");
  EXPECT_EQ(c->stored_sessions(), 1u);

  // Sessions belong to credentials: bob gets his own.
  ASSERT_TRUE(
      wait<CoreInfo>([&](auto cb) { c->get_core_info(Credentials::bearer("tok-bob"), cb); }).ok());
  reqs = site->take_requests();
  EXPECT_EQ(header(reqs[0], "X-UNICORE-SecuritySession"), "<absent>");
  EXPECT_EQ(c->stored_sessions(), 2u);

  site->faults({{"expire_sessions", true}});
  auto after = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_TRUE(after.ok()) << after.error().message;
  ASSERT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
  reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 3u);
  EXPECT_EQ(header(reqs[0], "X-UNICORE-SecuritySession"), first);       // → 432
  EXPECT_EQ(header(reqs[1], "X-UNICORE-SecuritySession"), "<absent>");  // dropped, retried once
  std::string renewed = header(reqs[2], "X-UNICORE-SecuritySession");
  EXPECT_NE(renewed, "<absent>");
  EXPECT_NE(renewed, first);
}

TEST_F(ClientTest, BadRepliesAreClearErrorsAndTheClientCarriesOn) {
  auto c = client([](ClientOptions& o) {
    o.retry.max_attempts = 1;
    o.max_json_body = 1 << 20;
  });
  auto expect_error = [&](json garbage, ErrorKind kind, std::string needle) {
    site->faults({{"garbage_next", garbage}});
    auto r = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
    ASSERT_FALSE(r.ok()) << garbage.dump();
    EXPECT_EQ(r.error().kind, kind) << garbage.dump() << ": " << r.error().message;
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find(site->url()), std::string::npos) << r.error().message;
    auto next = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
    EXPECT_TRUE(next.ok()) << "client unusable after " << garbage.dump();
  };
  expect_error({{"kind", "html"}}, ErrorKind::server, "HTML page");
  expect_error({{"kind", "not_json_200"}}, ErrorKind::bad_reply, "not valid JSON");
  expect_error({{"kind", "truncated_json"}}, ErrorKind::bad_reply, "not valid JSON");
  expect_error({{"kind", "missing_fields"}}, ErrorKind::bad_reply, "\"client\"");
  expect_error({{"kind", "huge"}, {"size", 4 << 20}}, ErrorKind::bad_reply,
               "larger than 1048576 bytes");
  // A connection dropped without an answer. On a fresh connection (curl itself repeats a request
  // once when a *reused* connection turns out dead), with retries off: a clear error.
  {
    auto fresh = client([](ClientOptions& o) { o.retry.max_attempts = 1; });
    site->faults({{"garbage_next", {{"kind", "drop"}}}});
    auto r = wait<CoreInfo>([&](auto cb) { fresh->get_core_info(alice, cb); });
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().kind, ErrorKind::connect);
    EXPECT_NE(r.error().message.find(site->url()), std::string::npos) << r.error().message;
  }

  // missing fields on a job's properties
  JobDescription d;
  d.executable = "true";
  std::string job = submit(*c, d);
  site->faults({{"garbage_next", {{"kind", "missing_fields"}}}});
  auto j = wait<JobInfo>([&](auto cb) { c->get_job(alice, job, cb); });
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.error().kind, ErrorKind::bad_reply);
  EXPECT_NE(j.error().message.find("\"status\""), std::string::npos) << j.error().message;
}

TEST_F(ClientTest, RetriesRideOutGarbageFromAProxyAndDroppedConnections) {
  auto c = client([](ClientOptions& o) { o.retry.max_attempts = 3; });
  site->faults({{"garbage_next", {{"kind", "html"}, {"count", 2}}}});
  EXPECT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
  site->faults({{"garbage_next", {{"kind", "drop"}, {"count", 2}}}});
  EXPECT_TRUE(wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); }).ok());
}

TEST_F(ClientTest, AHangingSiteIsATimeout) {
  auto c = client([](ClientOptions& o) {
    o.retry.max_attempts = 1;
    o.request_timeout = 700ms;
  });
  site->faults({{"garbage_next", {{"kind", "hang"}, {"seconds", 5}}}});
  auto r = wait<CoreInfo>([&](auto cb) { c->get_core_info(alice, cb); });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().kind, ErrorKind::timeout);
  EXPECT_NE(r.error().message.find("did not answer"), std::string::npos) << r.error().message;
}

TEST_F(ClientTest, UnreachableSiteIsAConnectErrorAfterRetries) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t len = sizeof a;
  getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  close(s);  // nobody listens on this port now
  std::string url =
      "http://127.0.0.1:" + std::to_string(ntohs(a.sin_port)) + "/DEMO-SITE/rest/core";
  ClientOptions o;
  o.base_url = url;
  o.retry.initial_delay = 10ms;
  o.retry.max_attempts = 3;
  UnicoreClient c(io, o);
  auto r = wait<CoreInfo>([&](auto cb) { c.get_core_info(alice, cb); });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().kind, ErrorKind::connect);
  EXPECT_NE(r.error().message.find(url), std::string::npos);
  EXPECT_NE(r.error().message.find("3 attempts"), std::string::npos) << r.error().message;
}

TEST_F(ClientTest, CredentialsGoOnlyToTheConfiguredSite) {
  auto c = client();
  for (std::string other :
       std::vector<std::string>{"https://evil.example/SITE/rest/core/jobs/x",
                                site->url().substr(0, site->url().find("/DEMO")) + "0/x"}) {
    auto r = wait<JobInfo>([&](auto cb) { c->get_job(alice, other, cb); });
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().kind, ErrorKind::invalid_argument);
    EXPECT_NE(r.error().message.find("not on the UNICORE site"), std::string::npos);
  }
  auto bad_id = wait<JobInfo>([&](auto cb) { c->get_job(alice, "x/../../y", cb); });
  EXPECT_EQ(bad_id.error().kind, ErrorKind::invalid_argument);
  auto injected =
      wait<CoreInfo>([&](auto cb) { c->get_core_info(Credentials::bearer("t\r\nX-Evil: 1"), cb); });
  EXPECT_EQ(injected.error().kind, ErrorKind::invalid_argument);
  EXPECT_TRUE(site->take_requests().empty());
}

class TlsClientTest : public ClientTest {
 protected:
  void SetUp() override {
    tls_dir =
        std::filesystem::temp_directory_path() / ("kb-uclient-tls-" + std::to_string(getpid()));
    std::filesystem::create_directories(tls_dir);
    std::string cmd =
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 "
        "-addext subjectAltName=IP:127.0.0.1 -keyout " +
        (tls_dir / "key.pem").string() + " -out " + (tls_dir / "cert.pem").string() +
        " >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "openssl could not make a test certificate";
    testing::SiteOptions o;
    o.extra_args = {"--tls-cert", (tls_dir / "cert.pem").string(), "--tls-key",
                    (tls_dir / "key.pem").string()};
    site = std::make_unique<TestSite>(o);
  }
  void TearDown() override {
    site.reset();
    std::error_code ec;
    std::filesystem::remove_all(tls_dir, ec);
  }
  std::filesystem::path tls_dir;
};

TEST_F(TlsClientTest, VerifiesAgainstTheConfiguredCaAndRefusesAnUnknownOne) {
  ASSERT_EQ(site->url().rfind("https://", 0), 0u);
  auto system_ca = client([](ClientOptions& o) { o.retry.max_attempts = 3; });
  auto refused = wait<CoreInfo>([&](auto cb) { system_ca->get_core_info(alice, cb); });
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().kind, ErrorKind::tls);
  EXPECT_NE(refused.error().message.find("ca-file"), std::string::npos);
  EXPECT_TRUE(site->take_requests().empty());  // no credentials crossed an unverified connection

  auto pinned = client([&](ClientOptions& o) { o.tls.ca_file = (tls_dir / "cert.pem").string(); });
  auto ok = wait<CoreInfo>([&](auto cb) { pinned->get_core_info(alice, cb); });
  ASSERT_TRUE(ok.ok()) << ok.error().message;

  auto insecure = client([](ClientOptions& o) { o.tls.verify = false; });
  EXPECT_TRUE(wait<CoreInfo>([&](auto cb) { insecure->get_core_info(alice, cb); }).ok());
}

}  // namespace
}  // namespace kb::unicore
