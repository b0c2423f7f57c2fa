#pragma once
// The UNICORE job a kernel's allocation runs: the shell script that starts the agent (which starts
// the kernel) on the compute node, and the job description that carries it and the link secret.
// Pure functions of a JobPlan; used by the kernel lifecycle and exposed for tests.
#include <chrono>
#include <string>

#include "bridge/config.hpp"
#include "bridge/kernel_service.hpp"
#include "unicore/job_description.hpp"

namespace kb::bridge {

// Names of the files the job and the agent keep in the job's working directory.
inline constexpr const char* kJobScriptFile = "kernel-bridge-job.sh";
inline constexpr const char* kSecretFile = "kernel-bridge-link.secret";
inline constexpr const char* kDiscoveryFile = "kernel-bridge-agent.json";
inline constexpr const char* kUploadedAgentFile = "kernel-bridge-agent";

// The job a kernel's allocation runs (pure; exposed for tests and `kernel-bridge doctor`).
struct JobPlan {
  std::string kernel_id;
  std::string owner;
  const SiteConfig* site = nullptr;
  KernelRequest request;  // resources already defaulted and checked
  std::string secret_hex;
  std::chrono::seconds agent_no_bridge_timeout{600};
};
// The shell script the job runs: finds the node's address, then the site's job_template with
// {agent} (the agent's command line, which runs the kernel) and {kernel_argv} expanded.
std::string build_job_script(const JobPlan& plan);
unicore::JobDescription build_job_description(const JobPlan& plan);
// POSIX shell single-quoting.
std::string shell_quote(const std::string& word);

}  // namespace kb::bridge
