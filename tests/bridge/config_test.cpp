// Tests bridge/config.*: the sample parses; each kind of mistake gives "file:line: what is wrong";
// durations, sizes, defaults and limits.
#include "bridge/config.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "tests/common/temp_dir.hpp"

namespace kb::bridge {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// A minimal valid configuration whose files live in `dir`. Lines are numbered in comments so the
// expected line numbers below can be read off.
std::string minimal(const kb::test::TempDir& dir, const std::string& site_extra = "",
                    const std::string& bridge_extra = "") {
  dir.write("id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\n", 0600);
  dir.write("known_hosts", "login1 ssh-ed25519 AAAA\n", 0644);
  return "[bridge]\n"  // 1
         "state_dir = \"" +
         dir.file("state") + "\"\n"                                                  // 2
         + bridge_extra +                                                            //
         "[api]\n"                                                                   // 3
         "unix_socket = \"api.sock\"\n"                                              // 4
         "[[site]]\n"                                                                // 5
         "name = \"demo\"\n"                                                         // 6
         "unicore_url = \"https://u.example:8080/DEMO/rest/core/\"\n"                // 7
         "login_hosts = [\"login1.example.org\"]\n"                                  // 8
         "known_hosts = \"known_hosts\"\n"                                           // 9
         "ssh_user = \"kbridge\"\n"                                                  // 10
         "ssh_identity = \"id_ed25519\"\n"                                           // 11
         "agent = { mode = \"installed\", path = \"/opt/kb/bin/kernel-bridge\" }\n"  // 12
         + site_extra;
}

std::string error_of(const std::string& text, const std::string& file) {
  try {
    parse_config(text, file);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Config, SampleFileParses) {
  const std::string path = std::string(std::getenv("KB_SOURCE_DIR")) + "/etc/kernel-bridge.toml";
  // The sample names files of a real installation (/etc/kernel-bridge/…): check only its syntax
  // and schema here.
  BridgeConfig config = load_config(path, LoadOptions{.check_files = false});
  ASSERT_EQ(config.sites.size(), 1u);
  const SiteConfig& site = config.sites[0];
  EXPECT_EQ(site.name, "demo");
  EXPECT_EQ(config.restart_grace, std::chrono::seconds(30));
  EXPECT_EQ(config.api.unix_socket, "/run/kernel-bridge/api.sock");
  EXPECT_EQ(site.login_hosts.size(), 2u);
  EXPECT_EQ(site.login_hosts[1].port, 22);
  EXPECT_EQ(site.agent.mode, AgentConfig::Mode::installed);
  EXPECT_EQ(site.defaults.queue, "batch");
  EXPECT_EQ(site.limits.max_runtime, std::chrono::hours(24));
  EXPECT_EQ(site.limits.max_memory, 256ull << 30);
  EXPECT_EQ(site.kernels.at("python3").back(), "{connection_file}");
  EXPECT_THAT(site.job_template, HasSubstr("{agent}"));
}

TEST(Config, MinimalConfigResolvesRelativePathsAgainstTheFile) {
  kb::test::TempDir dir;
  BridgeConfig config = parse_config(minimal(dir), dir.file("kb.toml"));
  const SiteConfig& site = config.sites.at(0);
  EXPECT_EQ(config.api.unix_socket, dir.file("api.sock"));
  EXPECT_EQ(site.ssh_identity, dir.file("id_ed25519"));
  EXPECT_EQ(site.unicore_url, "https://u.example:8080/DEMO/rest/core");  // trailing '/' dropped
  EXPECT_EQ(site.login_hosts.at(0).str(), "login1.example.org:22");
  EXPECT_EQ(config.find_site("demo"), &site);
  EXPECT_EQ(config.find_site("nope"), nullptr);
}

TEST(Config, UnknownKeyIsAnErrorWithItsLineAndASuggestion) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  EXPECT_EQ(
      error_of(minimal(dir, "ssh_identiy = \"x\"\n"), file),
      file + ":13: unknown key 'ssh_identiy' in site \"demo\" (did you mean 'ssh_identity'?)");
  EXPECT_EQ(error_of(minimal(dir, "", "restart_grase = \"1m\"\n"), file),
            file + ":3: unknown key 'restart_grase' in [bridge] (did you mean 'restart_grace'?)");
  EXPECT_THAT(
      error_of(minimal(dir, "[site.limits]\nmax_wallclock = \"1h\"\n"), file),
      StartsWith(file + ":14: unknown key 'max_wallclock' in site \"demo\": limits; known keys: "));
}

TEST(Config, WrongTypeNamesKeyAndTypes) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  EXPECT_EQ(error_of(minimal(dir, "verify_tls = \"no\"\n"), file),
            file + ":13: site.verify_tls must be true or false, not a string");
  EXPECT_EQ(error_of(minimal(dir, "[site.defaults]\nnodes = \"2\"\n"), file),
            file + ":14: defaults.nodes must be an integer, not a string");
  EXPECT_EQ(error_of(minimal(dir, "[site.limits]\nmax_runtime = 3600\n"), file),
            file +
                ":14: limits.max_runtime must be a duration string such as \"30s\", \"15m\", "
                "\"2h30m\" or \"1d\", not an integer");
}

TEST(Config, BadDurationAndSizeSayWhatIsExpected) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  EXPECT_EQ(error_of(minimal(dir, "", "restart_grace = \"30x\"\n"), file),
            file +
                ":3: bridge.restart_grace: \"30x\" is not a duration: unknown unit 'x' (use d, h, "
                "m or s) "
                "(write e.g. \"30s\", \"15m\", \"2h30m\", \"1d\")");
  EXPECT_THAT(
      error_of(minimal(dir, "", "restart_grace = \"30\"\n"), file),
      StartsWith(file +
                 ":3: bridge.restart_grace: \"30\" is not a duration: a unit is missing after 30"));
  EXPECT_THAT(error_of(minimal(dir, "[site.limits]\nmax_memory = \"16Q\"\n"), file),
              StartsWith(file + ":14: limits.max_memory: \"16Q\" is not a size: unknown unit 'Q'"));
}

TEST(Config, MissingRequiredKeyPointsAtItsTable) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  std::string text = minimal(dir);
  const std::string line = "ssh_user = \"kbridge\"\n";
  text.erase(text.find(line), line.size());
  EXPECT_EQ(error_of(text, file), file + ":5: missing required key 'ssh_user' in site \"demo\"");

  std::string no_state = minimal(dir);
  no_state.erase(no_state.find("state_dir"), no_state.find("[api]") - no_state.find("state_dir"));
  EXPECT_EQ(error_of(no_state, file), file + ":1: missing required key 'state_dir' in bridge");
}

TEST(Config, SecretFilePermissionsAreChecked) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  const std::string text = minimal(dir);
  ::chmod(dir.file("id_ed25519").c_str(), 0644);
  EXPECT_EQ(error_of(text, file),
            file + ":11: site \"demo\": ssh_identity " + dir.file("id_ed25519") +
                " is accessible by group or others (mode 0644); run: chmod 600 " +
                dir.file("id_ed25519"));
  ::chmod(dir.file("id_ed25519").c_str(), 0600);
  ::unlink(dir.file("known_hosts").c_str());
  EXPECT_THAT(error_of(text, file),
              StartsWith(file + ":9: site \"demo\": known_hosts " + dir.file("known_hosts") +
                         ": No such file or directory"));
  std::filesystem::create_directory(dir.file("known_hosts"));
  EXPECT_EQ(error_of(text, file), file + ":9: site \"demo\": known_hosts " +
                                      dir.file("known_hosts") + " is not a regular file");
}

TEST(Config, TomlSyntaxErrorsCarryTheLine) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  EXPECT_THAT(error_of(minimal(dir, "gpu_mode = \n"), file), StartsWith(file + ":13: "));
}

TEST(Config, SemanticErrors) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  EXPECT_EQ(error_of(minimal(dir, "gpu_mode = \"gpus\"\n"), file),
            file +
                ":13: site \"demo\": gpu_mode \"gpus\" is not known (use \"gpus_per_node\" or "
                "\"batch_lines\")");
  EXPECT_EQ(error_of(minimal(dir, "job_template = \"module load x\\n{agnet}\"\n"), file),
            file +
                ":13: site \"demo\": job_template has an unknown placeholder {agnet} (did you mean "
                "{agent}?)");
  EXPECT_EQ(error_of(minimal(dir, "job_template = \"echo ${HOME}\"\n"), file),
            file +
                ":13: site \"demo\": job_template must contain {agent}: the job's main process is "
                "the agent, which starts the kernel");
  EXPECT_EQ(error_of(minimal(dir, "kernels = { py = [\"python3\"] }\n"), file),
            file +
                ":13: site \"demo\": kernels.py must contain \"{connection_file}\" (the agent puts "
                "the kernel's connection file there)");
  EXPECT_EQ(
      error_of(
          minimal(dir, "[site.defaults]\nruntime = \"48h\"\n[site.limits]\nmax_runtime = \"1d\"\n"),
          file),
      file +
          ":14: site \"demo\": defaults.runtime is outside the site's limits: runtime 48h exceeds "
          "the site's max_runtime 24h");
  EXPECT_EQ(error_of(minimal(dir, "[[site]]\nname = \"demo\"\n"), file),
            file + ":13: missing required key 'unicore_url' in site \"demo\"");
  std::string tcp = minimal(dir);
  tcp.insert(tcp.find("[[site]]"), "tcp = \"127.0.0.1:8765\"\n");
  EXPECT_EQ(
      error_of(tcp, file),
      file + ":5: api.tcp needs api.tokens_file: TCP callers authenticate with bearer tokens");
  std::string port = minimal(dir);
  port.replace(port.find("login1.example.org"), 18, "a:99999");
  EXPECT_EQ(
      error_of(port, file),
      file + ":8: site \"demo\": login host \"a:99999\": port must be a number from 1 to 65535");
}

TEST(Config, LoadReportsAMissingFile) {
  try {
    load_config("/nonexistent/kernel-bridge.toml");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()),
              "/nonexistent/kernel-bridge.toml: cannot read the configuration file: No such file "
              "or directory");
  }
}

// Issue 15: `config check` / `serve` on /dev/zero read forever, on a FIFO blocked forever, and a
// directory was reported as "missing table [bridge]". Each is refused at once, naming what it is.
TEST(Config, LoadRefusesWhatIsNotASmallRegularFile) {
  kb::test::TempDir dir;
  const std::string fifo = dir.file("fifo.toml");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::string big = dir.file("big.toml");
  dir.write("big.toml", "# " + std::string(kMaxConfigBytes, 'x') + "\n", 0644);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"/dev/zero", "it is a character device, not a regular file"},
      {fifo, "it is a FIFO (named pipe), not a regular file"},
      {dir.path(), "it is a directory, not a regular file"},
      {big, "it is larger than 1 MiB; is it the right file?"},
  };
  for (const auto& [path, reason] : cases) {
    try {
      load_config(path);
      ADD_FAILURE() << path << ": expected ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_EQ(std::string(e.what()), path + ": cannot read the configuration file: " + reason);
    }
  }
}

// Runs `command`, returns (exit status, stdout+stderr).
std::pair<int, std::string> run(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return {-1, ""};
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) output.append(buf, n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST(Config, CheckCommandExitsTwoWithTheMessage) {
  const char* binary = std::getenv("KB_BINARY");
#ifdef KB_BINARY_PATH
  if (!binary) binary = KB_BINARY_PATH;
#endif
  if (!binary || ::access(binary, X_OK) != 0) GTEST_SKIP() << "kernel-bridge binary not built";
  kb::test::TempDir dir;
  const std::string good = dir.write("good.toml", minimal(dir), 0644);
  auto [ok_status, ok_output] = run(std::string(binary) + " config check " + good);
  EXPECT_EQ(ok_status, 0) << ok_output;
  EXPECT_EQ(ok_output, good + ": valid (1 site: demo)\n");
  const std::string bad = dir.write("bad.toml", minimal(dir, "ssh_identiy = \"x\"\n"), 0644);
  auto [bad_status, bad_output] = run(std::string(binary) + " config check " + bad);
  EXPECT_EQ(bad_status, 2);
  EXPECT_EQ(
      bad_output,
      bad + ":13: unknown key 'ssh_identiy' in site \"demo\" (did you mean 'ssh_identity'?)\n");
}

TEST(Durations, ParseAndFormat) {
  EXPECT_EQ(parse_duration("30s"), std::chrono::seconds(30));
  EXPECT_EQ(parse_duration("1h"), std::chrono::hours(1));
  EXPECT_EQ(parse_duration("2h30m"), std::chrono::minutes(150));
  EXPECT_EQ(parse_duration("1d"), std::chrono::hours(24));
  EXPECT_EQ(parse_duration("30min"), std::chrono::minutes(30));
  std::string error;
  EXPECT_FALSE(parse_duration("30m2h", &error));
  EXPECT_THAT(error, HasSubstr("larger to smaller"));
  EXPECT_FALSE(parse_duration("", &error));
  EXPECT_FALSE(parse_duration("-5s", &error));
  EXPECT_FALSE(parse_duration("1.5h", &error));
  EXPECT_EQ(format_duration(std::chrono::seconds(93784)), "26h3m4s");
  EXPECT_EQ(format_duration(std::chrono::hours(48)), "48h");
  EXPECT_EQ(format_duration(std::chrono::seconds(0)), "0s");
}

TEST(Sizes, ParseAndFormat) {
  EXPECT_EQ(parse_size("512M"), 512ull << 20);
  EXPECT_EQ(parse_size("16G"), 16ull << 30);
  EXPECT_EQ(parse_size("16GiB"), 16ull << 30);
  EXPECT_EQ(parse_size("1t"), 1ull << 40);
  std::string error;
  EXPECT_FALSE(parse_size("16", &error));
  EXPECT_THAT(error, HasSubstr("a unit is missing"));
  EXPECT_FALSE(parse_size("99999999999999999T", &error));
  EXPECT_EQ(format_size(16ull << 30), "16G");
  EXPECT_EQ(format_size(1536ull << 20), "1536M");
}

SiteConfig limited_site() {
  SiteConfig site;
  site.name = "demo";
  site.defaults.queue = "batch";
  site.defaults.runtime = std::chrono::hours(1);
  site.limits.queues = {"batch", "gpus"};
  site.limits.max_nodes = 4;
  site.limits.max_gpus = 4;
  site.limits.max_runtime = std::chrono::hours(24);
  site.limits.max_memory = 64ull << 30;
  return site;
}

TEST(Limits, ValidateRequestNamesTheViolatedLimit) {
  const SiteConfig site = limited_site();
  KernelRequest request;
  apply_defaults(site, request.resources);
  EXPECT_EQ(request.resources.queue, "batch");
  EXPECT_EQ(request.resources.runtime, std::chrono::hours(1));
  EXPECT_FALSE(validate_request(site, request));

  KernelRequest r = request;
  r.resources.runtime = std::chrono::hours(48);
  auto v = validate_request(site, r);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->field, "resources.runtime");
  EXPECT_EQ(v->limit, "max_runtime");
  EXPECT_EQ(v->message, "runtime 48h exceeds the site's max_runtime 24h");

  r = request;
  r.resources.queue = "debug";
  v = validate_request(site, r);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->limit, "queues");
  EXPECT_EQ(v->message, "queue \"debug\" is not allowed on site demo (allowed: batch, gpus)");

  r = request;
  r.resources.nodes = 5;
  EXPECT_EQ(validate_request(site, r)->limit, "max_nodes");
  r = request;
  r.resources.gpus = 8;
  EXPECT_EQ(validate_request(site, r)->limit, "max_gpus");
  r = request;
  r.resources.memory = 128ull << 30;
  EXPECT_EQ(validate_request(site, r)->message, "memory 128G exceeds the site's max_memory 64G");
  r = request;
  r.resources.nodes = 4;
  r.resources.gpus = 4;
  r.resources.runtime = std::chrono::hours(24);
  EXPECT_FALSE(validate_request(site, r));  // limits are inclusive
}

TEST(ClosestMatch, SuggestsOnlyNearNames) {
  EXPECT_EQ(closest_match("ssh_idenity", {"ssh_user", "ssh_identity"}), "ssh_identity");
  EXPECT_EQ(closest_match("max_run", {"max_runtime", "max_nodes"}), "max_runtime");
  EXPECT_EQ(closest_match("colour", {"state_dir", "log_level"}), "");
}

}  // namespace
}  // namespace kb::bridge

// [[site.partitions]]: each brings its limits and defaults; what it leaves out is the site's.
namespace kb::bridge {
namespace {

const char* kPartitions =
    "reservations = [\"maint\"]\n"
    "[site.defaults]\n"
    "queue = \"batch\"\n"
    "runtime = \"1h\"\n"
    "[site.limits]\n"
    "max_nodes = 8\n"
    "max_runtime = \"24h\"\n"
    "[[site.partitions]]\n"
    "name = \"batch\"\n"
    "max_gpus = 0\n"
    "[[site.partitions]]\n"
    "name = \"gpus\"\n"
    "description = \"4 GPUs per node\"\n"
    "max_nodes = 2\n"
    "max_gpus = 4\n"
    "max_runtime = \"6h\"\n"
    "default_gpus = 1\n"
    "default_runtime = \"2h\"\n";

TEST(ConfigPartitions, EachPartitionHasItsLimitsAndDefaultsAndInheritsTheSites) {
  kb::test::TempDir dir;
  const BridgeConfig config = parse_config(minimal(dir, kPartitions), dir.file("kb.toml"));
  const SiteConfig& site = config.sites.at(0);
  ASSERT_EQ(site.partitions.size(), 2u);
  EXPECT_EQ(site.partitions[1].description, "4 GPUs per node");
  EXPECT_EQ(allowed_queues(site), (std::vector<std::string>{"batch", "gpus"}));
  EXPECT_EQ(site.reservations, std::vector<std::string>{"maint"});

  ResourceRequest gpu;
  gpu.queue = "gpus";
  apply_defaults(site, gpu);
  EXPECT_EQ(gpu.gpus, 1);
  EXPECT_EQ(gpu.runtime, std::chrono::hours(2));  // the partition's default, not the site's
  ResourceRequest batch;
  apply_defaults(site, batch);
  EXPECT_EQ(batch.queue, "batch");
  EXPECT_EQ(batch.runtime, std::chrono::hours(1));  // the site's

  EXPECT_EQ(effective_limits(site, std::string("gpus")).max_nodes, 2);
  EXPECT_EQ(effective_limits(site, std::string("batch")).max_nodes, 8);  // inherited

  KernelRequest r;
  r.resources = gpu;
  EXPECT_FALSE(validate_request(site, r));
  r.resources.nodes = 3;
  auto v = validate_request(site, r);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->field, "resources.nodes");
  EXPECT_EQ(v->limit, "max_nodes");
  EXPECT_EQ(v->message, "nodes 3 exceeds partition gpus's max_nodes 2");
  r.resources = batch;
  r.resources.nodes = 9;
  EXPECT_EQ(validate_request(site, r)->message, "nodes 9 exceeds the site's max_nodes 8");
  r.resources = batch;
  r.resources.gpus = 1;
  EXPECT_EQ(validate_request(site, r)->message, "gpus 1 exceeds partition batch's max_gpus 0");
  r.resources = gpu;
  r.resources.runtime = std::chrono::hours(7);
  EXPECT_EQ(validate_request(site, r)->message,
            "runtime 7h exceeds partition gpus's max_runtime 6h");
  r.resources = batch;
  r.resources.queue = "gpu";
  v = validate_request(site, r);
  EXPECT_EQ(v->limit, "partitions");
  EXPECT_EQ(v->message, "queue \"gpu\" is not allowed on site demo (allowed: batch, gpus)");
  r.resources = batch;
  r.resources.reservation = "other";
  v = validate_request(site, r);
  EXPECT_EQ(v->limit, "reservations");
  EXPECT_EQ(v->message, "reservation \"other\" is not offered on site demo (offered: maint)");
  r.resources.reservation = "maint";
  EXPECT_FALSE(validate_request(site, r));
}

TEST(ConfigPartitions, MistakesAreRefusedWithTheirLine) {
  kb::test::TempDir dir;
  const std::string file = dir.file("kb.toml");
  // Both ways of listing queues.
  EXPECT_THAT(error_of(minimal(dir,
                               "[site.limits]\nqueues = [\"a\"]\n[[site.partitions]]\n"
                               "name = \"a\"\n"),
                       file),
              HasSubstr("give the queues either as limits.queues or as [[site.partitions]]"));
  // The same partition twice.
  EXPECT_THAT(error_of(minimal(dir,
                               "[[site.partitions]]\nname = \"a\"\n[[site.partitions]]\n"
                               "name = \"a\"\n"),
                       file),
              HasSubstr("partition \"a\" is listed twice"));
  // A default outside the partition's own limit.
  EXPECT_THAT(error_of(minimal(dir,
                               "[[site.partitions]]\nname = \"a\"\nmax_nodes = 1\n"
                               "default_nodes = 2\n"),
                       file),
              HasSubstr("partition \"a\": its defaults are outside its limits: nodes 2 exceeds "
                        "partition a's max_nodes 1"));
  // An unknown key, and a site default queue that is no partition.
  EXPECT_THAT(error_of(minimal(dir, "[[site.partitions]]\nname = \"a\"\nmax_node = 1\n"), file),
              HasSubstr("max_node"));
  EXPECT_THAT(error_of(minimal(dir,
                               "[site.defaults]\nqueue = \"b\"\n[[site.partitions]]\n"
                               "name = \"a\"\n"),
                       file),
              HasSubstr("queue \"b\" is not allowed on site demo (allowed: a)"));
}

}  // namespace
}  // namespace kb::bridge
