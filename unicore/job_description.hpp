#pragma once
// A UNICORE job description (the UNICORE/X REST API's job JSON; the fields the test site accepts
// are in tests/unicore_site/unicore_site.py) and its JSON form. Plain value; any thread.
#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "unicore/result.hpp"

namespace kb::unicore {

// How to ask for GPUs at a site. The reference notes a server bug (UNICORE 9.3 up to today): the
// TSI writes #TSI_GPUS_PER_NODE from the *memory* variable, so the GPUsPerNode resource may request
// the wrong thing. A site therefore chooses:
//   gpus_per_node — send Resources.GPUsPerNode (sites whose TSI is fixed or verified);
//   batch_lines   — send a raw batch header instead ("Job type": "raw" with a "BSS file" staged in
//                   inline), the only mechanism the reference documents for raw batch-system lines.
//                   In raw mode UNICORE does not translate Resources, so the header carries every
//                   resource as a Slurm #SBATCH line (mapping from reference §3). Slurm only.
enum class GpuMode { gpus_per_node, batch_lines };

struct JobResources {
  std::optional<std::string> queue;
  std::optional<int> nodes;
  std::optional<std::string> runtime;  // seconds ("3600") or UNICORE units ("30min", "2h", "1d")
  std::optional<std::string> project;
  std::optional<std::string> reservation;
  std::optional<std::string> node_constraints;
  std::optional<std::string> qos;
  std::optional<std::string> memory;  // "16G"
  std::optional<int> cpus_per_node;
  std::optional<int> gpus_per_node;
};

// A file to put into the job's working directory before it runs: inline text (`data`) or a copy
// from a URL/path (`from`).
struct JobImport {
  std::string to;
  std::optional<std::string> data;
  std::optional<std::string> from;
  std::optional<std::string> permissions;  // e.g. "rwx------"
  bool fail_on_error = true;
};

struct JobDescription {
  std::string executable;
  std::vector<std::string> arguments;
  std::map<std::string, std::string> environment;
  std::vector<JobImport> imports;
  JobResources resources;
  std::optional<std::string> name;
  std::vector<std::string> tags;
  std::optional<std::string> stdout_file;
  std::optional<std::string> stderr_file;
  std::optional<std::string>
      job_type;  // "BATCH" (default) or "ON_LOGIN_NODE"; "raw" is set by batch_lines
  bool have_client_stage_in = false;  // the job waits for uploads and an explicit start()
  std::vector<std::string>
      extra_batch_lines;  // added verbatim to the raw header (batch_lines mode)
  std::string bss_file = "kb-batch-header.sh";  // name of the staged raw header (batch_lines mode)

  // The JSON body for POST BASE/jobs. Validates first (kind invalid_argument, saying what is
  // wrong).
  Result<nlohmann::json> to_json(GpuMode gpu_mode) const;
};

// Runtime in seconds from "3600", "90s", "30min", "2h", "1d" (as UNICORE reads it); nullopt if
// malformed.
std::optional<long> parse_runtime_seconds(const std::string& runtime);

}  // namespace kb::unicore
