// Tests of kernelspec/kernelspec.* and the pure parts of kernelspec/kernel_wrapper.* (what goes
// into kernel.json, where it is written, what the wrapper sends, how it exits).
#include "kernelspec/kernelspec.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>

#include "kernelspec/kernel_wrapper.hpp"
#include "link/connection_file.hpp"
#include "tests/common/temp_dir.hpp"

namespace kb::bridge {
namespace {

using nlohmann::json;

// Sets an environment variable for one test and restores it afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

json read_json(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return json::parse(s.str());
}

TEST(KernelName, AcceptsJupytersCharactersAndLowercases) {
  EXPECT_EQ(validate_kernel_name("HPC-Python_3.11"), "hpc-python_3.11");
}

TEST(KernelName, RefusesOtherCharactersNamingThem) {
  try {
    validate_kernel_name("my kernel");
    FAIL() << "a space was accepted";
  } catch (const KernelspecError& e) {
    EXPECT_NE(std::string(e.what()).find("' '"), std::string::npos) << e.what();
  }
  EXPECT_THROW(validate_kernel_name("a/b"), KernelspecError);
  EXPECT_THROW(validate_kernel_name(""), KernelspecError);
  EXPECT_THROW(validate_kernel_name(".."), KernelspecError);
}

TEST(CommandLine, SplitsWordsWithQuotes) {
  EXPECT_EQ(
      split_command_line("python3 -m ipykernel_launcher -f {connection_file}"),
      (std::vector<std::string>{"python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"}));
  EXPECT_EQ(split_command_line(R"(sh -c 'echo "a b"' x\ y "q\"z")"),
            (std::vector<std::string>{"sh", "-c", "echo \"a b\"", "x y", "q\"z"}));
  EXPECT_EQ(split_command_line(R"(["a b", "{connection_file}"])"),
            (std::vector<std::string>{"a b", "{connection_file}"}));
  EXPECT_THROW(split_command_line("sh -c 'unbalanced"), KernelspecError);
  EXPECT_THROW(split_command_line("[1, 2]"), KernelspecError);
}

TEST(DataDir, FollowsJupyterCoreRules) {
  ScopedEnv home("HOME", "/home/u");
  {
    ScopedEnv j("JUPYTER_DATA_DIR", "/j");
    ScopedEnv x("XDG_DATA_HOME", "/x");
    EXPECT_EQ(jupyter_user_data_dir(), "/j");
  }
  {
    ScopedEnv j("JUPYTER_DATA_DIR", nullptr);
    ScopedEnv x("XDG_DATA_HOME", "/x");
    EXPECT_EQ(jupyter_user_data_dir(), "/x/jupyter");
  }
  ScopedEnv j("JUPYTER_DATA_DIR", nullptr);
  ScopedEnv x("XDG_DATA_HOME", nullptr);
  EXPECT_EQ(jupyter_user_data_dir(), "/home/u/.local/share/jupyter");
}

KernelspecInstall sample() {
  KernelspecInstall spec;
  spec.name = "Box-GPU";
  spec.executable = "/opt/kb/bin/kernel-bridge";
  spec.request.site = "box";
  spec.request.socket = "/run/kb.sock";
  spec.request.queue = "gpus";
  spec.request.nodes = 1;
  spec.request.gpus = 2;
  spec.request.runtime = "2h";
  spec.request.project = "proj1";
  return spec;
}

TEST(KernelJson, ArgvRunsTheWrapperWithTheResources) {
  json k = make_kernel_json(sample());
  EXPECT_EQ(k["argv"],
            json::parse(R"(["/opt/kb/bin/kernel-bridge", "kernel", "--socket", "/run/kb.sock",
      "--site", "box", "--partition", "gpus", "--nodes", "1", "--gpus", "2", "--runtime", "2h",
      "--project", "proj1", "{connection_file}"])"));
  EXPECT_EQ(k["interrupt_mode"], "signal");
  EXPECT_EQ(k["language"], "python");
  EXPECT_EQ(k["display_name"], "box: Python (kernel-bridge)");
  EXPECT_EQ(k["metadata"]["kernel_bridge"]["site"], "box");
  EXPECT_EQ(k["metadata"]["kernel_bridge"]["resources"]["gpus"], 2);
}

TEST(KernelJson, LeaseIsPassedToTheWrapper) {
  KernelspecInstall spec = sample();
  spec.request.lease = 30;
  json argv = make_kernel_json(spec)["argv"];
  ASSERT_GE(argv.size(), 3u);
  EXPECT_EQ(argv[argv.size() - 3], "--lease");
  EXPECT_EQ(argv[argv.size() - 2], "30");
}

TEST(KernelJson, KernelArgvNeedsThePlaceholderAndExcludesKernel) {
  auto spec = sample();
  spec.request.kernel_argv = {"python3", "-m", "ipykernel_launcher"};
  EXPECT_THROW(make_kernel_json(spec), KernelspecError);
  spec.request.kernel_argv.push_back("-f={connection_file}");
  json k = make_kernel_json(spec);
  auto argv = k["argv"].get<std::vector<std::string>>();
  auto it = std::find(argv.begin(), argv.end(), "--kernel-argv");
  ASSERT_NE(it, argv.end());
  EXPECT_EQ(json::parse(*(it + 1)), json(spec.request.kernel_argv));  // one JSON word, exact
  spec.request.kernel = "python3";
  EXPECT_THROW(make_kernel_json(spec), KernelspecError);
}

TEST(Install, WritesIntoTheChosenJupyterPath) {
  kb::test::TempDir dir;
  auto spec = sample();
  spec.jupyter_path = dir.path();
  const std::string where = install_kernelspec(spec);
  EXPECT_EQ(where, dir.path() + "/kernels/box-gpu");
  json k = read_json(where + "/kernel.json");
  EXPECT_EQ(k["argv"][1], "kernel");
  struct stat st {};
  ASSERT_EQ(::stat((where + "/kernel.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  // Installing again replaces it.
  spec.display_name = "second";
  install_kernelspec(spec);
  EXPECT_EQ(read_json(where + "/kernel.json")["display_name"], "second");
}

TEST(Install, PrefixAndUserDir) {
  kb::test::TempDir dir;
  auto spec = sample();
  spec.prefix = dir.path();
  EXPECT_EQ(install_kernelspec(spec), dir.path() + "/share/jupyter/kernels/box-gpu");
  spec.prefix.clear();
  ScopedEnv j("JUPYTER_DATA_DIR", (dir.path() + "/data").c_str());
  EXPECT_EQ(install_kernelspec(spec), dir.path() + "/data/kernels/box-gpu");
  spec.prefix = "/a";
  spec.jupyter_path = "/b";
  EXPECT_THROW(install_kernelspec(spec), KernelspecError);
}

TEST(Install, UnwritableDestinationSaysWhatToDo) {
  auto spec = sample();
  spec.jupyter_path = "/proc/kernel-bridge-cannot-write-here";
  try {
    install_kernelspec(spec);
    FAIL() << "installed into /proc";
  } catch (const KernelspecError& e) {
    EXPECT_NE(std::string(e.what()).find("--jupyter-path"), std::string::npos) << e.what();
  }
}

TEST(WrapperRequest, SendsExactlyTheConnectionFilesPortsAndKey) {
  kb::test::TempDir dir;
  const std::string cf = dir.write("kernel-1.json", R"({"ip": "127.0.0.1", "transport": "tcp",
      "shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003, "control_port": 50004,
      "hb_port": 50005, "key": "secret-key", "signature_scheme": "hmac-sha256",
      "kernel_name": "box-gpu", "jupyter_session": "x"})");
  WrapperRequest r;
  r.site = "box";
  r.runtime = "2h";
  r.gpus = 0;
  json body = make_create_request(r, cf);
  EXPECT_EQ(body["site"], "box");
  EXPECT_EQ(body["connection"], json::parse(R"({"ip": "127.0.0.1", "transport": "tcp",
      "shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003, "control_port": 50004,
      "hb_port": 50005, "key": "secret-key", "signature_scheme": "hmac-sha256", "kernel_name": "box-gpu"})"));
  EXPECT_EQ(body["resources"], json::parse(R"({"runtime": "2h", "gpus": 0})"));
  EXPECT_EQ(body["name"], "box-gpu");
  EXPECT_FALSE(body.contains("kernel_argv"));
  // The wrapper always asks for a lease, so that a killed wrapper leaves no kernel behind.
  EXPECT_EQ(body["lease"], kDefaultWrapperLease);
  r.lease = 20;
  EXPECT_EQ(make_create_request(r, cf)["lease"], 20);
}

TEST(WrapperRequest, BadConnectionFileNamesFileAndField) {
  kb::test::TempDir dir;
  const std::string cf =
      dir.write("bad.json", R"({"ip": "127.0.0.1", "shell_port": 1, "key": ""})");
  WrapperRequest r;
  r.site = "box";
  try {
    make_create_request(r, cf);
    FAIL() << "accepted a connection file without iopub_port";
  } catch (const tunnel::ConnectionFileError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(cf), std::string::npos) << m;
    EXPECT_NE(m.find("iopub_port"), std::string::npos) << m;
  }
  EXPECT_THROW(make_create_request(r, dir.file("missing.json")), tunnel::ConnectionFileError);
}

TEST(WrapperExit, StatusFollowsTheKernelsEnd) {
  EXPECT_EQ(exit_status_for(json::parse(R"({"end_cause": "shutdown"})")), 0);
  EXPECT_EQ(exit_status_for(json::parse(R"({"end_cause": "kernel_exited", "exit_code": 3})")), 3);
  EXPECT_EQ(exit_status_for(json::parse(
                R"({"end_cause": "kernel_exited", "exit_code": null, "exit_signal": 9})")),
            137);
  EXPECT_EQ(exit_status_for(json::parse(R"({"end_cause": "walltime"})")), 1);
  EXPECT_EQ(exit_status_for(json::parse(R"({"end_cause": "job_failed"})")), 1);
  EXPECT_EQ(exit_status_for(json::parse(R"({})")), 1);
}

}  // namespace
}  // namespace kb::bridge
