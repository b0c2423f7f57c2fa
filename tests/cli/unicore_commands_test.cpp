// `kernel-bridge unicore …` against the test site: output a person reads, --json, exit codes, and
// secrets only from files or the environment.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>

#include "tests/unicore/site_fixture.hpp"

namespace kb::unicore {
namespace {

using nlohmann::json;
using testing::TestSite;

struct CliRun {
  int code = -1;
  std::string out;
  std::string err;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    binary = testing::env_or("KB_BINARY", KB_TEST_BINARY);
    if (!std::filesystem::exists(binary))
      GTEST_SKIP() << "no kernel-bridge executable at " << binary;
    site = std::make_unique<TestSite>();
    token_file = site->dir() + "/token";
    std::ofstream(token_file) << "tok-alice\n";
    std::filesystem::permissions(
        token_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  }

  // Runs kernel-bridge with `args` (shell-quoted by the caller), env cleared of KB_UNICORE_*.
  CliRun run(const std::string& args, const std::string& env = "") {
    std::string out = site->dir() + "/out", err = site->dir() + "/err";
    std::string cmd = "env -u KB_UNICORE_TOKEN -u KB_UNICORE_URL -u KB_UNICORE_PASSWORD " + env +
                      " '" + binary + "' " + args + " >'" + out + "' 2>'" + err + "'";
    int status = std::system(cmd.c_str());
    CliRun r;
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
  }

  std::string common() {
    return "unicore --url '" + site->url() + "' --token-file '" + token_file + "' ";
  }

  std::string binary;
  std::string token_file;
  std::unique_ptr<TestSite> site;
};

TEST_F(CliTest, InfoShowsWhoTheSiteThinksYouAre) {
  CliRun r = run(common() + "info");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("DEMO-SITE"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("uid:         alice"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("proj1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("batch, gpus"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("enabled"), std::string::npos) << r.out;

  CliRun j = run(common() + "--json info");
  ASSERT_EQ(j.code, 0) << j.err;
  json v = json::parse(j.out, nullptr, false);
  ASSERT_FALSE(v.is_discarded()) << j.out;
  EXPECT_EQ(v["uid"], "alice");
  EXPECT_EQ(v["siteName"], "DEMO-SITE");

  // The token from the environment works too, and never appears on argv.
  CliRun e = run("unicore --url '" + site->url() + "' info", "KB_UNICORE_TOKEN=tok-alice");
  EXPECT_EQ(e.code, 0) << e.err;
  auto reqs = site->take_requests();
  ASSERT_EQ(reqs.size(), 3u);
  for (const auto& q : reqs) EXPECT_EQ(q["headers"]["Authorization"], "Bearer tok-alice");
}

TEST_F(CliTest, SubmitJobsStatusLsCatDelete) {
  CliRun s =
      run(common() +
          "submit --executable 'echo from-the-job > result.txt' --tag cli-test --queue batch");
  ASSERT_EQ(s.code, 0) << s.err;
  std::string job = s.out.substr(0, s.out.find('\n'));
  ASSERT_EQ(job.rfind(site->url() + "/jobs/", 0), 0u) << s.out;
  std::string id = job.substr(job.rfind('/') + 1);

  CliRun jobs = run(common() + "jobs --tags cli-test");
  ASSERT_EQ(jobs.code, 0) << jobs.err;
  EXPECT_EQ(jobs.out, job + "\n");

  // Wait for the job to finish (the CLI is a one-shot tool: poll it like an operator would).
  CliRun st;
  for (int i = 0; i < 100; ++i) {
    st = run(common() + "status " + id);
    if (st.out.find("SUCCESSFUL") != std::string::npos ||
        st.out.find("FAILED") != std::string::npos)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(st.code, 0) << st.err;
  EXPECT_NE(st.out.find("status:      SUCCESSFUL"), std::string::npos) << st.out;
  EXPECT_NE(st.out.find("exit code:   0"), std::string::npos) << st.out;

  CliRun ls = run(common() + "ls " + id);
  ASSERT_EQ(ls.code, 0) << ls.err;
  EXPECT_NE(ls.out.find("/result.txt"), std::string::npos) << ls.out;

  CliRun cat = run(common() + "cat '" + job + "' result.txt");
  ASSERT_EQ(cat.code, 0) << cat.err;
  EXPECT_EQ(cat.out, "from-the-job\n");

  CliRun details = run(common() + "--json details " + id);
  ASSERT_EQ(details.code, 0) << details.err;
  EXPECT_EQ(json::parse(details.out)["nodes"], json::parse(R"(["cn0007","cn0008"])"));

  CliRun del = run(common() + "delete " + id);
  ASSERT_EQ(del.code, 0) << del.err;
  CliRun gone = run(common() + "status " + id);
  EXPECT_EQ(gone.code, 1);
  EXPECT_NE(gone.err.find("not found"), std::string::npos) << gone.err;
}

TEST_F(CliTest, FailedJobShowsTheReason) {
  CliRun s = run(common() + "submit --executable 'exit 3'");
  ASSERT_EQ(s.code, 0) << s.err;
  std::string job = s.out.substr(0, s.out.find('\n'));
  CliRun st;
  for (int i = 0; i < 100; ++i) {
    st = run(common() + "status '" + job + "'");
    if (st.out.find("FAILED") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(st.out.find("reason:      User application exited with non-zero exit code: <3>"),
            std::string::npos)
      << st.out;
}

// Issue 15: a job that ended without reaching the batch system was reported as "has not reached
// the batch system" yet; the message now says it has ended. And `cat` refuses paths with "..",
// which the server would normalise to a resource outside the job's storage.
TEST_F(CliTest, DetailsOfAnEndedJobAndPathsOutsideTheStorage) {
  site.reset();
  testing::SiteOptions slow;
  slow.queue_delay = 60;
  site = std::make_unique<TestSite>(slow);
  token_file = site->dir() + "/token";
  std::ofstream(token_file) << "tok-alice\n";
  std::filesystem::permissions(
      token_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  CliRun s = run(common() + "submit --executable 'echo never'");
  ASSERT_EQ(s.code, 0) << s.err;
  const std::string job = s.out.substr(0, s.out.find('\n'));
  CliRun queued = run(common() + "details '" + job + "'");
  ASSERT_EQ(queued.code, 0) << queued.err;
  EXPECT_NE(queued.out.find("has not reached the batch system"), std::string::npos) << queued.out;
  ASSERT_EQ(run(common() + "abort '" + job + "'").code, 0);
  CliRun ended;
  for (int i = 0; i < 100; ++i) {
    ended = run(common() + "details '" + job + "'");
    if (ended.out.find("has ended") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(ended.out.find("no batch system details: the job has ended (FAILED"), std::string::npos)
      << ended.out;
  for (const char* path : {"../../../etc/passwd", "a/../../x", ".."}) {
    CliRun cat = run(common() + "cat '" + job + "' '" + path + "'");
    EXPECT_EQ(cat.code, 2) << path << ": " << cat.out;
    EXPECT_NE(cat.err.find("leaves the job's working directory"), std::string::npos) << cat.err;
  }
  // Nothing was asked of the site for them.
  for (const auto& request : site->take_requests())
    EXPECT_EQ(request.value("path", "").find("passwd"), std::string::npos) << request.dump();
}

TEST_F(CliTest, RemoteErrorsExitOneUsageErrorsExitTwo) {
  std::ofstream(token_file) << "tok-wrong\n";
  CliRun refused = run(common() + "info");
  EXPECT_EQ(refused.code, 1);
  EXPECT_NE(refused.err.find("credentials refused by UNICORE site " + site->url()),
            std::string::npos)
      << refused.err;
  EXPECT_EQ(refused.err.find("tok-wrong"), std::string::npos);

  CliRun no_url = run("unicore --token-file '" + token_file + "' info");
  EXPECT_EQ(no_url.code, 2);
  EXPECT_NE(no_url.err.find("--url"), std::string::npos) << no_url.err;

  CliRun no_pw = run("unicore --url '" + site->url() + "' --user alice info");
  EXPECT_EQ(no_pw.code, 2);
  EXPECT_NE(no_pw.err.find("--password-file"), std::string::npos) << no_pw.err;

  CliRun bad_job = run(common() + "status 'https://elsewhere.example/jobs/1'");
  EXPECT_EQ(bad_job.code, 2);
  EXPECT_NE(bad_job.err.find("not on the UNICORE site"), std::string::npos) << bad_job.err;

  std::string pw = site->dir() + "/pw";
  std::ofstream(pw) << "alice-pw";
  std::filesystem::permissions(pw, std::filesystem::perms::owner_read);
  CliRun basic =
      run("unicore --url '" + site->url() + "' --user alice --password-file '" + pw + "' info");
  EXPECT_EQ(basic.code, 0) << basic.err;
}

TEST_F(CliTest, HelpExplainsTheCommands) {
  CliRun h = run("unicore --help");
  EXPECT_EQ(h.code, 0);
  for (const char* word :
       {"info", "jobs", "status", "details", "ls", "cat", "abort", "delete", "submit",
        "KB_UNICORE_TOKEN", "--token-file", "--insecure", "Exit status"}) {
    EXPECT_NE(h.out.find(word), std::string::npos) << word << "\n" << h.out;
  }
}

}  // namespace
}  // namespace kb::unicore
