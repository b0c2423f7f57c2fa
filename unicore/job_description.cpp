#include "unicore/job_description.hpp"

#include <cctype>

namespace kb::unicore {

namespace {

UnicoreError invalid(const std::string& why) {
  return UnicoreError{ErrorKind::invalid_argument, 0, "invalid job description: " + why, "", ""};
}

bool has_control(const std::string& s, bool allow_newline = false) {
  for (unsigned char c : s) {
    if (c == '\n' && allow_newline) continue;
    if (c == '\t') continue;
    if (c < 0x20 || c == 0x7f) return true;
  }
  return false;
}

bool env_name_ok(const std::string& name) {
  if (name.empty() || std::isdigit(static_cast<unsigned char>(name[0]))) return false;
  for (unsigned char c : name) {
    if (!std::isalnum(c) && c != '_') return false;
  }
  return true;
}

bool relative_path_ok(const std::string& path) {
  if (path.empty() || path[0] == '/' || has_control(path)) return false;
  std::size_t pos = 0;
  while (pos <= path.size()) {
    std::size_t slash = path.find('/', pos);
    std::string part =
        path.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
    if (part == "..") return false;
    pos = slash == std::string::npos ? path.size() + 1 : slash + 1;
  }
  return true;
}

// Inline data as the reference shows it: a list of lines. A trailing newline becomes a final empty
// element, so joining the lines with "\n" gives back exactly the original text.
nlohmann::json to_lines(const std::string& text) {
  nlohmann::json lines = nlohmann::json::array();
  std::size_t pos = 0;
  while (true) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) {
      lines.push_back(text.substr(pos));
      break;
    }
    lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return lines;
}

}  // namespace

std::optional<long> parse_runtime_seconds(const std::string& runtime) {
  std::size_t i = 0;
  while (i < runtime.size() && std::isdigit(static_cast<unsigned char>(runtime[i]))) ++i;
  if (i == 0 || i > 9) return std::nullopt;
  long value = std::stol(runtime.substr(0, i));
  std::string unit = runtime.substr(i);
  long factor = 0;
  if (unit.empty() || unit == "s" || unit == "sec")
    factor = 1;
  else if (unit == "m" || unit == "min")
    factor = 60;
  else if (unit == "h")
    factor = 3600;
  else if (unit == "d")
    factor = 86400;
  else
    return std::nullopt;
  return value * factor;
}

Result<nlohmann::json> JobDescription::to_json(GpuMode gpu_mode) const {
  using nlohmann::json;
  if (executable.empty()) return invalid("Executable is empty");
  if (has_control(executable)) return invalid("Executable contains a control character");
  for (const auto& a : arguments) {
    if (has_control(a)) return invalid("an argument contains a control character");
  }
  for (const auto& [k, v] : environment) {
    if (!env_name_ok(k))
      return invalid("environment variable name '" + k + "' is not an identifier");
    if (has_control(v))
      return invalid("environment variable " + k + " contains a control character");
  }
  const JobResources& r = resources;
  if (r.nodes && *r.nodes <= 0) return invalid("Nodes must be at least 1");
  if (r.cpus_per_node && *r.cpus_per_node <= 0) return invalid("CPUsPerNode must be at least 1");
  if (r.gpus_per_node && *r.gpus_per_node < 0) return invalid("GPUs per node must not be negative");
  std::optional<long> runtime_s;
  if (r.runtime) {
    runtime_s = parse_runtime_seconds(*r.runtime);
    if (!runtime_s || *runtime_s <= 0) {
      return invalid("Runtime '" + *r.runtime + "' is not seconds or a number with s/min/h/d");
    }
  }
  for (const auto& t : tags) {
    if (t.empty() || t.find(',') != std::string::npos || has_control(t)) {
      return invalid("tag '" + t + "' is empty or contains ',' or a control character");
    }
  }
  for (const auto& line : extra_batch_lines) {
    if (line.empty() || line[0] != '#' || has_control(line)) {
      return invalid("raw batch line '" + line + "' must be one line starting with '#'");
    }
  }

  json j = json::object();
  j["Executable"] = executable;
  if (!arguments.empty()) j["Arguments"] = arguments;
  if (!environment.empty()) j["Environment"] = environment;
  if (name) j["Name"] = *name;
  if (!tags.empty()) j["Tags"] = tags;
  if (stdout_file) j["Stdout"] = *stdout_file;
  if (stderr_file) j["Stderr"] = *stderr_file;
  if (have_client_stage_in) j["haveClientStageIn"] = "true";

  json res = json::object();
  if (r.queue) res["Queue"] = *r.queue;
  if (r.nodes) res["Nodes"] = std::to_string(*r.nodes);
  if (r.runtime) res["Runtime"] = *r.runtime;
  if (r.project) res["Project"] = *r.project;
  if (r.reservation) res["Reservation"] = *r.reservation;
  if (r.node_constraints) res["NodeConstraints"] = *r.node_constraints;
  if (r.qos) res["QoS"] = *r.qos;
  if (r.memory) res["Memory"] = *r.memory;
  if (r.cpus_per_node) res["CPUsPerNode"] = std::to_string(*r.cpus_per_node);

  bool raw = gpu_mode == GpuMode::batch_lines &&
             ((r.gpus_per_node && *r.gpus_per_node > 0) || !extra_batch_lines.empty());
  if (gpu_mode == GpuMode::gpus_per_node && r.gpus_per_node) {
    res["GPUsPerNode"] = std::to_string(*r.gpus_per_node);
  }
  if (!res.empty()) j["Resources"] = res;

  json imports = json::array();
  for (const auto& im : this->imports) {
    if (!relative_path_ok(im.to)) {
      return invalid("import target '" + im.to +
                     "' must be a relative path inside the job directory");
    }
    if (im.data.has_value() == im.from.has_value()) {
      return invalid("import '" + im.to + "' needs exactly one of inline data or a source (From)");
    }
    json e = json::object();
    e["To"] = im.to;
    if (im.data) e["Data"] = to_lines(*im.data);
    if (im.from) e["From"] = *im.from;
    if (im.permissions) e["Permissions"] = *im.permissions;
    if (!im.fail_on_error) e["FailOnError"] = "false";
    imports.push_back(std::move(e));
  }

  if (raw) {
    if (job_type && *job_type != "BATCH" && *job_type != "raw") {
      return invalid("raw batch lines need a batch job, not Job type " + *job_type);
    }
    if (!relative_path_ok(bss_file))
      return invalid("BSS file name '" + bss_file + "' is not a relative path");
    // The raw header replaces the one UNICORE would generate, so it carries every resource.
    std::string header = "#!/bin/bash\n";
    auto line = [&header](const std::string& l) { header += "#SBATCH " + l + "\n"; };
    if (name) line("--job-name=" + *name);
    if (r.queue) line("--partition=" + *r.queue);
    if (r.project) line("--account=" + *r.project);
    if (r.nodes) line("--nodes=" + std::to_string(*r.nodes));
    if (r.cpus_per_node) line("--ntasks-per-node=" + std::to_string(*r.cpus_per_node));
    if (runtime_s) line("--time=" + std::to_string((*runtime_s + 59) / 60));
    if (r.memory) line("--mem=" + *r.memory);
    if (r.qos) line("--qos=" + *r.qos);
    if (r.reservation) line("--reservation=" + *r.reservation);
    if (r.node_constraints) line("--constraint=" + *r.node_constraints);
    if (r.gpus_per_node && *r.gpus_per_node > 0)
      line("--gpus-per-node=" + std::to_string(*r.gpus_per_node));
    for (const auto& l : extra_batch_lines) header += l + "\n";
    json e = json::object();
    e["To"] = bss_file;
    e["Data"] = to_lines(header);
    imports.push_back(std::move(e));
    j["Job type"] = "raw";
    j["BSS file"] = bss_file;
  } else if (job_type) {
    j["Job type"] = *job_type;
  }
  if (!imports.empty()) j["Imports"] = std::move(imports);
  return j;
}

}  // namespace kb::unicore
