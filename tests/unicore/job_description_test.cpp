#include "unicore/job_description.hpp"

#include <gtest/gtest.h>

namespace kb::unicore {
namespace {

using nlohmann::json;

JobDescription kernel_job() {
  JobDescription d;
  d.executable = "kernel-bridge agent";
  d.arguments = {"--port", "0"};
  d.environment = {{"KB_KERNEL_ID", "k1"}, {"PATH_EXTRA", "/opt/x"}};
  d.resources.queue = "gpus";
  d.resources.nodes = 1;
  d.resources.runtime = "2h";
  d.resources.project = "proj1";
  d.resources.reservation = "res1";
  d.resources.node_constraints = "a100";
  d.resources.qos = "normal";
  d.resources.memory = "16G";
  d.resources.gpus_per_node = 4;
  d.name = "jupyter-kernel";
  d.tags = {"jupyter", "kb"};
  d.stdout_file = "agent.out";
  d.stderr_file = "agent.err";
  d.imports.push_back(
      {"start.sh", std::string("#!/bin/bash\necho hi\n"), std::nullopt, "rwx------", true});
  return d;
}

TEST(JobDescription, MapsEveryFieldToTheReferenceKeys) {
  auto j = kernel_job().to_json(GpuMode::gpus_per_node);
  ASSERT_TRUE(j.ok()) << j.error().message;
  json expected = json::parse(R"({
    "Executable": "kernel-bridge agent",
    "Arguments": ["--port", "0"],
    "Environment": {"KB_KERNEL_ID": "k1", "PATH_EXTRA": "/opt/x"},
    "Name": "jupyter-kernel",
    "Tags": ["jupyter", "kb"],
    "Stdout": "agent.out",
    "Stderr": "agent.err",
    "Resources": {"Queue": "gpus", "Nodes": "1", "Runtime": "2h", "Project": "proj1",
                  "Reservation": "res1", "NodeConstraints": "a100", "QoS": "normal",
                  "Memory": "16G", "GPUsPerNode": "4"},
    "Imports": [{"To": "start.sh", "Data": ["#!/bin/bash", "echo hi", ""], "Permissions": "rwx------"}]
  })");
  EXPECT_EQ(j.value(), expected) << j.value().dump(2);
}

TEST(JobDescription, ClientStageInAndJobType) {
  JobDescription d;
  d.executable = "./run";
  d.have_client_stage_in = true;
  d.job_type = "ON_LOGIN_NODE";
  auto j = d.to_json(GpuMode::gpus_per_node);
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j.value()["haveClientStageIn"], "true");
  EXPECT_EQ(j.value()["Job type"], "ON_LOGIN_NODE");
  EXPECT_FALSE(j.value().contains("Resources"));
  EXPECT_FALSE(j.value().contains("Imports"));
}

TEST(JobDescription, InlineDataJoinsBackToTheExactText) {
  for (std::string text : {"a", "a\n", "a\nb", "\n\n", ""}) {
    JobDescription d;
    d.executable = "true";
    d.imports.push_back({"f", text, std::nullopt, std::nullopt, true});
    auto j = d.to_json(GpuMode::gpus_per_node);
    ASSERT_TRUE(j.ok());
    std::string joined;
    bool first = true;
    for (const auto& line : j.value()["Imports"][0]["Data"]) {
      if (!first) joined += "\n";
      joined += line.get<std::string>();
      first = false;
    }
    EXPECT_EQ(joined, text);
  }
}

TEST(JobDescription, FromImportAndFailOnError) {
  JobDescription d;
  d.executable = "true";
  d.imports.push_back(
      {"in/data.csv", std::nullopt, std::string("https://x/files/data.csv"), std::nullopt, false});
  auto j = d.to_json(GpuMode::gpus_per_node);
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j.value()["Imports"][0],
            json::parse(
                R"({"To":"in/data.csv","From":"https://x/files/data.csv","FailOnError":"false"})"));
}

TEST(JobDescription, BatchLinesModeWritesARawSlurmHeaderInsteadOfGPUsPerNode) {
  JobDescription d = kernel_job();
  d.extra_batch_lines = {"#SBATCH --hint=nomultithread"};
  auto j = d.to_json(GpuMode::batch_lines);
  ASSERT_TRUE(j.ok()) << j.error().message;
  const json& v = j.value();
  EXPECT_EQ(v["Job type"], "raw");
  EXPECT_EQ(v["BSS file"], d.bss_file);
  EXPECT_FALSE(v["Resources"].contains("GPUsPerNode"));
  EXPECT_EQ(v["Resources"]["Queue"], "gpus");  // kept for the server's own checks
  const json& header = v["Imports"].back();
  EXPECT_EQ(header["To"], d.bss_file);
  std::vector<std::string> lines = header["Data"];
  std::vector<std::string> expected = {"#!/bin/bash",
                                       "#SBATCH --job-name=jupyter-kernel",
                                       "#SBATCH --partition=gpus",
                                       "#SBATCH --account=proj1",
                                       "#SBATCH --nodes=1",
                                       "#SBATCH --time=120",
                                       "#SBATCH --mem=16G",
                                       "#SBATCH --qos=normal",
                                       "#SBATCH --reservation=res1",
                                       "#SBATCH --constraint=a100",
                                       "#SBATCH --gpus-per-node=4",
                                       "#SBATCH --hint=nomultithread",
                                       ""};
  EXPECT_EQ(lines, expected);
}

TEST(JobDescription, BatchLinesModeWithoutGpusIsAnOrdinaryJob) {
  JobDescription d;
  d.executable = "true";
  d.resources.queue = "batch";
  auto j = d.to_json(GpuMode::batch_lines);
  ASSERT_TRUE(j.ok());
  EXPECT_FALSE(j.value().contains("Job type"));
  EXPECT_FALSE(j.value().contains("BSS file"));
}

TEST(JobDescription, InvalidDescriptionsSayWhatIsWrong) {
  auto expect_invalid = [](JobDescription d, const std::string& needle) {
    auto j = d.to_json(GpuMode::gpus_per_node);
    ASSERT_FALSE(j.ok()) << needle;
    EXPECT_EQ(j.error().kind, ErrorKind::invalid_argument);
    EXPECT_NE(j.error().message.find(needle), std::string::npos) << j.error().message;
  };
  JobDescription base;
  base.executable = "true";
  JobDescription d = base;
  d.executable = "";
  expect_invalid(d, "Executable");
  d = base;
  d.environment["1BAD"] = "x";
  expect_invalid(d, "1BAD");
  d = base;
  d.resources.runtime = "soon";
  expect_invalid(d, "Runtime");
  d = base;
  d.resources.nodes = 0;
  expect_invalid(d, "Nodes");
  d = base;
  d.imports.push_back({"../escape", std::string("x"), std::nullopt, std::nullopt, true});
  expect_invalid(d, "../escape");
  d = base;
  d.imports.push_back({"both", std::string("x"), std::string("y"), std::nullopt, true});
  expect_invalid(d, "exactly one");
  d = base;
  d.tags = {"a,b"};
  expect_invalid(d, "a,b");
  d = base;
  d.arguments = {"line\nbreak"};
  expect_invalid(d, "control");
}

TEST(JobDescription, RuntimeUnits) {
  EXPECT_EQ(parse_runtime_seconds("3600"), 3600);
  EXPECT_EQ(parse_runtime_seconds("90s"), 90);
  EXPECT_EQ(parse_runtime_seconds("30min"), 1800);
  EXPECT_EQ(parse_runtime_seconds("2h"), 7200);
  EXPECT_EQ(parse_runtime_seconds("1d"), 86400);
  EXPECT_EQ(parse_runtime_seconds("2 h"), std::nullopt);
  EXPECT_EQ(parse_runtime_seconds("h"), std::nullopt);
  EXPECT_EQ(parse_runtime_seconds("-5"), std::nullopt);
}

}  // namespace
}  // namespace kb::unicore
