// Tests of bridge/job_script.*: the job script is run with bash (a fake agent prints the argv it
// gets), so hostile kernel arguments are shown to arrive verbatim and unexpanded; the job
// description is checked field by field.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "bridge/job_script.hpp"
#include "tests/common/temp_dir.hpp"

namespace kb::bridge {
namespace {

using test::TempDir;

SiteConfig demo_site() {
  SiteConfig site;
  site.name = "demo";
  site.agent.path = "/opt/kb/bin/kernel-bridge";
  site.job_tags = {"kernel-bridge", "jupyter"};
  site.environment = {{"OMP_NUM_THREADS", "4"}};
  return site;
}

JobPlan demo_plan(const SiteConfig& site) {
  JobPlan plan;
  plan.kernel_id = "0a1b2c3d4e5f";
  plan.owner = "alice";
  plan.site = &site;
  plan.request.site = site.name;
  plan.request.kernel_argv = {"python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"};
  plan.secret_hex = std::string(64, 'a');
  plan.agent_no_bridge_timeout = std::chrono::seconds(600);
  return plan;
}

// Runs `script` with bash in `dir` (KB_AGENT_ADDRESS set to `address`); what it printed.
std::string run_script(const TempDir& dir, const std::string& script, const std::string& address) {
  dir.write(kJobScriptFile, script, 0700);
  const std::string command = "cd " + dir.path() + " && KB_AGENT_ADDRESS=" + address +
                              " /bin/bash " + kJobScriptFile + " 2>/dev/null";
  FILE* out = ::popen(command.c_str(), "r");
  if (!out) return {};
  std::string bytes;
  char buffer[4096];
  for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, out)) > 0;) bytes.append(buffer, n);
  ::pclose(out);
  return bytes;
}

// A stand-in for the agent that prints each argument it gets, NUL-terminated.
std::string write_fake_agent(const TempDir& dir, const std::string& name) {
  return dir.write(name, "#!/bin/bash\nprintf '%s\\0' \"$@\"\n", 0700);
}

std::vector<std::string> split_nul(const std::string& bytes) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (std::size_t end; (end = bytes.find('\0', start)) != std::string::npos; start = end + 1) {
    out.push_back(bytes.substr(start, end - start));
  }
  return out;
}

TEST(JobScriptTest, ShellQuoteLeavesPlainWordsAloneAndSingleQuotesTheRest) {
  EXPECT_EQ(shell_quote("python3"), "python3");
  EXPECT_EQ(shell_quote("/opt/kb/bin/kernel-bridge"), "/opt/kb/bin/kernel-bridge");
  EXPECT_EQ(shell_quote("--ip=127.0.0.1:8888,x+y@z%"), "--ip=127.0.0.1:8888,x+y@z%");
  EXPECT_EQ(shell_quote(""), "''");
  EXPECT_EQ(shell_quote("a b"), "'a b'");
  EXPECT_EQ(shell_quote("{connection_file}"), "'{connection_file}'");
  EXPECT_EQ(shell_quote("it's"), "'it'\\''s'");
  EXPECT_EQ(shell_quote("$(id)"), "'$(id)'");
}

TEST(JobScriptTest, HostileKernelArgumentsReachTheAgentVerbatim) {
  TempDir dir;
  SiteConfig site = demo_site();
  site.agent.path = write_fake_agent(dir, "fake agent");  // a space in the path, too
  JobPlan plan = demo_plan(site);
  plan.request.kernel_argv = {"python3",
                              "$(touch pwned)",
                              "`touch pwned`",
                              "; touch pwned",
                              "it's",
                              "a  b",
                              "",
                              "\"",
                              "\\",
                              "*",
                              "line1\nline2",
                              "$HOME",
                              "{connection_file}"};
  std::vector<std::string> got = split_nul(run_script(dir, build_job_script(plan), "10.1.2.3"));
  std::vector<std::string> want = {"agent",        "--listen",
                                   "10.1.2.3:0",   "--secret-file",
                                   kSecretFile,    "--discovery-file",
                                   kDiscoveryFile, "--no-bridge-timeout",
                                   "600",          "--"};
  want.insert(want.end(), plan.request.kernel_argv.begin(), plan.request.kernel_argv.end());
  EXPECT_EQ(got, want);
  EXPECT_FALSE(std::filesystem::exists(dir.file("pwned")));
}

TEST(JobScriptTest, AnIpv6AgentAddressIsBracketed) {
  TempDir dir;
  SiteConfig site = demo_site();
  site.agent.path = write_fake_agent(dir, "agent");
  std::vector<std::string> got =
      split_nul(run_script(dir, build_job_script(demo_plan(site)), "fd00::42"));
  ASSERT_GE(got.size(), 3u);
  EXPECT_EQ(got[1], "--listen");
  EXPECT_EQ(got[2], "[fd00::42]:0");
}

TEST(JobScriptTest, TheSitesTemplateGetsTheAgentAndTheQuotedArgv) {
  TempDir dir;
  SiteConfig site = demo_site();
  site.job_template = "module load python\nprintf '%s\\0' {kernel_argv}";  // no final newline
  JobPlan plan = demo_plan(site);
  plan.request.kernel_argv = {"python3", "it's", "$(touch pwned)"};
  const std::string script = build_job_script(plan);
  EXPECT_EQ(script.rfind("#!/bin/bash\n", 0), 0u);
  EXPECT_NE(script.find("# kernel-bridge kernel 0a1b2c3d4e5f of alice on site demo.\n"),
            std::string::npos);
  EXPECT_NE(
      script.find("\nmodule load python\nprintf '%s\\0' python3 'it'\\''s' '$(touch pwned)'\n"),
      std::string::npos)
      << script;
  EXPECT_EQ(script.back(), '\n');
  // Run it without `module` (bash says "command not found" on stderr and goes on).
  std::string printed = run_script(dir, script, "10.1.2.3");
  EXPECT_EQ(split_nul(printed), plan.request.kernel_argv);
  EXPECT_FALSE(std::filesystem::exists(dir.file("pwned")));
}

TEST(JobScriptTest, AnUploadedAgentIsMadeExecutableAndRunFromTheJobDirectory) {
  SiteConfig site = demo_site();
  site.agent.mode = AgentConfig::Mode::upload;
  const std::string script = build_job_script(demo_plan(site));
  const std::string chmod = std::string("chmod 700 ./") + kUploadedAgentFile + " || exit 2\n";
  const std::string exec = std::string("exec ./") + kUploadedAgentFile + " agent --listen";
  ASSERT_NE(script.find(chmod), std::string::npos) << script;
  ASSERT_NE(script.find(exec), std::string::npos) << script;
  EXPECT_LT(script.find(chmod), script.find(exec));
  EXPECT_TRUE(build_job_description(demo_plan(site)).have_client_stage_in);
}

TEST(JobScriptTest, TheDescriptionRunsTheScriptAndImportsTheSecretPrivately) {
  SiteConfig site = demo_site();
  JobPlan plan = demo_plan(site);
  plan.request.name = "analysis";
  plan.request.tags = {{"project", "x1"}};
  plan.request.resources.queue = "batch";
  plan.request.resources.nodes = 2;
  plan.request.resources.runtime = std::chrono::seconds(5400);
  plan.request.resources.project = "p42";
  plan.request.resources.memory = 16ull << 30;
  plan.request.resources.gpus = 0;
  unicore::JobDescription d = build_job_description(plan);
  EXPECT_EQ(d.executable, "/bin/bash");
  EXPECT_EQ(d.arguments, std::vector<std::string>{kJobScriptFile});
  EXPECT_EQ(d.environment, site.environment);
  ASSERT_EQ(d.imports.size(), 2u);
  EXPECT_EQ(d.imports[0].to, kJobScriptFile);
  EXPECT_EQ(d.imports[0].data, build_job_script(plan));
  EXPECT_EQ(d.imports[0].permissions, "rwx------");
  EXPECT_EQ(d.imports[1].to, kSecretFile);
  EXPECT_EQ(d.imports[1].data, plan.secret_hex + "\n");
  EXPECT_EQ(d.imports[1].permissions, "rw-------");
  EXPECT_EQ(d.resources.queue, "batch");
  EXPECT_EQ(d.resources.nodes, 2);
  EXPECT_EQ(d.resources.runtime, "5400");
  EXPECT_EQ(d.resources.project, "p42");
  EXPECT_EQ(d.resources.memory, "16G");
  EXPECT_FALSE(d.resources.gpus_per_node.has_value());  // 0 GPUs: none asked for
  EXPECT_EQ(d.name, "kernel-bridge analysis");
  EXPECT_EQ(d.tags, (std::vector<std::string>{"kernel-bridge", "jupyter",
                                              "kernel-bridge-kernel:0a1b2c3d4e5f",
                                              "kernel-bridge-user:alice", "project=x1"}));
  EXPECT_FALSE(d.have_client_stage_in);

  plan.request.name.clear();
  plan.request.resources.gpus = 4;
  d = build_job_description(plan);
  EXPECT_EQ(d.name, "kernel-bridge 0a1b2c3d4e5f");  // unnamed: the kernel's id
  EXPECT_EQ(d.resources.gpus_per_node, 4);
}

}  // namespace
}  // namespace kb::bridge
