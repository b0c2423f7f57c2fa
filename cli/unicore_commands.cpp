// `kernel-bridge unicore …`: a small operator CLI over the UNICORE client, for checking a site by
// hand. Runs its own io_context on the main thread (blocking is fine here: this is not the bridge's
// loop).
#include <sys/stat.h>

#include <boost/asio/io_context.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>

#include "cli/commands.hpp"
#include "common/files.hpp"
#include "unicore/client.hpp"

namespace kb::unicore {

namespace {

constexpr int kExitRemote = 1;
constexpr int kExitUsage = 2;

struct CliOptions {
  std::string url;
  std::string token_file;
  std::string user;
  std::string password_file;
  std::string ca_file;
  bool insecure = false;
  std::string preferences;
  double timeout_s = 60;
  int retries = 3;
  bool json = false;
  std::string gpu_mode = "gpus_per_node";
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "kernel-bridge unicore: %s\n", message.c_str());
  throw ExitStatus{kExitUsage};
}

[[noreturn]] void remote_error(const UnicoreError& e) {
  std::fprintf(stderr, "kernel-bridge unicore: %s\n", e.message.c_str());
  throw ExitStatus{e.kind == ErrorKind::invalid_argument ? kExitUsage : kExitRemote};
}

std::string read_secret_file(const std::string& path, const char* what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    usage_error(std::string("cannot read the ") + what + " file " + path);
  if (st.st_mode & 077) {
    std::fprintf(stderr,
                 "kernel-bridge unicore: warning: %s file %s is readable by other users; "
                 "chmod 600 it\n",
                 what, path.c_str());
  }
  std::string s;
  try {
    s = read_small_file(path, 1024 * 1024);
  } catch (const FileReadError& e) {
    usage_error(std::string("cannot read the ") + what + " file " + path + ": " + e.reason());
  }
  while (!s.empty() &&
         (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
    s.pop_back();
  if (s.empty()) usage_error(std::string("the ") + what + " file " + path + " is empty");
  return s;
}

Credentials credentials_from(const CliOptions& o) {
  Preferences prefs;
  if (!o.preferences.empty()) {
    auto p = Preferences::parse(o.preferences);
    if (!p) usage_error(p.error().message);
    prefs = p.value();
  }
  if (!o.user.empty() && !o.token_file.empty())
    usage_error("give either --token-file or --user, not both");
  Credentials c;
  if (!o.user.empty()) {
    std::string password;
    if (!o.password_file.empty()) {
      password = read_secret_file(o.password_file, "password");
    } else if (const char* env = std::getenv("KB_UNICORE_PASSWORD"); env && *env) {
      password = env;
    } else {
      usage_error(
          "--user needs --password-file F (or KB_UNICORE_PASSWORD); passwords never go on the "
          "command line");
    }
    c = Credentials::basic(o.user, password, prefs);
  } else if (!o.password_file.empty()) {
    usage_error("--password-file needs --user");
  } else if (!o.token_file.empty()) {
    c = Credentials::bearer(read_secret_file(o.token_file, "token"), prefs);
  } else if (const char* env = std::getenv("KB_UNICORE_TOKEN"); env && *env) {
    c = Credentials::bearer(env, prefs);
  } else {
    c = Credentials::anonymous(prefs);
  }
  if (std::string why = c.validate(); !why.empty()) usage_error(why);
  return c;
}

// Runs the client's io_context until `start`'s callback has delivered a result.
template <class T, class Start>
Result<T> run_sync(boost::asio::io_context& io, Start&& start) {
  std::optional<Result<T>> out;
  start([&out](Result<T> r) { out.emplace(std::move(r)); });
  io.restart();
  while (!out && io.run_one()) {
  }
  if (!out)
    return UnicoreError{ErrorKind::cancelled, 0, "the request ended without an answer", "", ""};
  return std::move(*out);
}

template <class T>
T must(Result<T> r) {
  if (!r) remote_error(r.error());
  return std::move(r.value());
}

struct Session {
  boost::asio::io_context io;
  std::unique_ptr<UnicoreClient> client;
  Credentials creds;
  bool json = false;

  explicit Session(const CliOptions& o) {
    std::string url = o.url;
    if (url.empty()) {
      if (const char* env = std::getenv("KB_UNICORE_URL"); env && *env) url = env;
    }
    if (url.empty())
      usage_error("no site: give --url https://<gateway>/<SITE>/rest/core (or KB_UNICORE_URL)");
    if (o.insecure && !o.ca_file.empty())
      usage_error("give either --ca-file or --insecure, not both");
    if (o.timeout_s <= 0) usage_error("--timeout must be positive");
    ClientOptions opts;
    opts.base_url = url;
    opts.tls.verify = !o.insecure;
    opts.tls.ca_file = o.ca_file;
    opts.request_timeout = std::chrono::milliseconds(static_cast<long long>(o.timeout_s * 1000));
    opts.connect_timeout = std::min(opts.connect_timeout, opts.request_timeout);
    opts.retry.max_attempts = std::max(1, o.retries + 1);
    if (o.gpu_mode == "batch_lines")
      opts.gpu_mode = GpuMode::batch_lines;
    else if (o.gpu_mode != "gpus_per_node")
      usage_error("--gpu-mode is gpus_per_node or batch_lines");
    creds = credentials_from(o);
    json = o.json;
    try {
      client = std::make_unique<UnicoreClient>(io, opts);
    } catch (const std::invalid_argument& e) {
      usage_error(e.what());
    }
  }

  std::string job(const std::string& id) { return must(client->job_url(id)); }

  JobInfo job_info(const std::string& id) {
    std::string url = job(id);
    return must(run_sync<JobInfo>(io, [&](auto cb) { client->get_job(creds, url, cb); }));
  }
};

void print_json(const nlohmann::json& j) {
  std::cout << j.dump(2) << "\n";
}

std::string joined(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string out;
  for (const auto& s : v) {
    if (!out.empty()) out += sep;
    out += s;
  }
  return out.empty() ? "-" : out;
}

nlohmann::json job_json(const JobInfo& j) {
  nlohmann::json o = {{"url", j.url},
                      {"status", to_string(j.status)},
                      {"statusMessage", j.status_message},
                      {"batchSystemID", j.batch_system_id},
                      {"queue", j.queue},
                      {"name", j.name},
                      {"tags", j.tags},
                      {"submissionTime", j.submission_time},
                      {"terminationTime", j.termination_time},
                      {"workingDirectory", j.working_directory}};
  o["exitCode"] = j.exit_code ? nlohmann::json(*j.exit_code) : nlohmann::json(nullptr);
  return o;
}

void cmd_info(const CliOptions& o) {
  Session s(o);
  CoreInfo i =
      must(run_sync<CoreInfo>(s.io, [&](auto cb) { s.client->get_core_info(s.creds, cb); }));
  if (s.json) {
    print_json({{"url", s.client->base_url()},
                {"siteName", i.site_name},
                {"serverVersion", i.server_version},
                {"dn", i.dn},
                {"uid", i.uid},
                {"availableUIDs", i.available_uids},
                {"group", i.group},
                {"availableGroups", i.available_groups},
                {"role", i.role},
                {"availableRoles", i.available_roles},
                {"authenticationMethod", i.authentication_method},
                {"queues", i.queues},
                {"jobSubmissionEnabled", i.job_submission_enabled},
                {"jobSubmissionMessage", i.job_submission_message}});
    return;
  }
  std::cout << "site:        " << (i.site_name.empty() ? "-" : i.site_name) << " (UNICORE "
            << (i.server_version.empty() ? "version unknown" : i.server_version) << ")\n"
            << "url:         " << s.client->base_url() << "\n"
            << "user:        " << (i.dn.empty() ? "-" : i.dn) << ", role " << i.role;
  if (!i.authentication_method.empty())
    std::cout << ", authenticated by " << i.authentication_method;
  std::cout << "\n"
            << "uid:         " << (i.uid.empty() ? "-" : i.uid)
            << " (available: " << joined(i.available_uids) << ")\n"
            << "group:       " << (i.group.empty() ? "-" : i.group)
            << " (projects: " << joined(i.available_groups) << ")\n"
            << "queues:      " << joined(i.queues) << "\n"
            << "submission:  " << (i.job_submission_enabled ? "enabled" : "DISABLED");
  if (!i.job_submission_message.empty()) std::cout << " (" << i.job_submission_message << ")";
  std::cout << "\n";
}

void cmd_jobs(const CliOptions& o, const std::vector<std::string>& tags) {
  Session s(o);
  ListJobsQuery q;
  for (const auto& t : tags) {
    std::stringstream ss(t);
    std::string one;
    while (std::getline(ss, one, ',')) {
      if (!one.empty()) q.tags.push_back(one);
    }
  }
  auto jobs = must(run_sync<std::vector<std::string>>(
      s.io, [&](auto cb) { s.client->list_jobs(s.creds, q, cb); }));
  if (s.json) return print_json(jobs);
  for (const auto& j : jobs) std::cout << j << "\n";
  if (jobs.empty()) std::cerr << "no jobs" << (q.tags.empty() ? "" : " with these tags") << "\n";
}

void cmd_status(const CliOptions& o, const std::string& id) {
  Session s(o);
  JobInfo j = s.job_info(id);
  if (s.json) return print_json(job_json(j));
  std::cout << "job:         " << j.url << "\n"
            << "status:      " << to_string(j.status) << "\n";
  if (j.status == JobStatus::failed)
    std::cout << "reason:      " << j.failure_reason() << "\n";
  else if (!j.status_message.empty())
    std::cout << "message:     " << j.status_message << "\n";
  std::cout << "exit code:   " << (j.exit_code ? std::to_string(*j.exit_code) : "-") << "\n"
            << "name:        " << (j.name.empty() ? "-" : j.name) << "\n"
            << "queue:       " << (j.queue.empty() ? "-" : j.queue) << "\n"
            << "batch id:    " << (j.batch_system_id.empty() ? "-" : j.batch_system_id) << "\n"
            << "tags:        " << joined(j.tags) << "\n"
            << "submitted:   " << (j.submission_time.empty() ? "-" : j.submission_time) << "\n"
            << "terminated:  " << (j.termination_time.empty() ? "-" : j.termination_time) << "\n"
            << "directory:   " << s.client->working_directory(j) << "\n";
}

void cmd_details(const CliOptions& o, const std::string& id) {
  Session s(o);
  std::string url = s.job(id);
  JobDetails d =
      must(run_sync<JobDetails>(s.io, [&](auto cb) { s.client->get_details(s.creds, url, cb); }));
  if (s.json) {
    print_json({{"available", d.available},
                {"batchJobId", d.batch_job_id},
                {"jobState", d.job_state},
                {"batchHost", d.batch_host},
                {"nodeList", d.node_list},
                {"nodes", d.nodes},
                {"raw", d.raw}});
    return;
  }
  if (!d.available) {
    // Why there are none depends on where the job is: not yet in the batch system, or out of it.
    JobInfo j = s.job_info(id);
    if (is_terminal(j.status)) {
      std::cout << "no batch system details: the job has ended (" << to_string(j.status)
                << (j.termination_time.empty() ? "" : " at " + j.termination_time)
                << ") and the site reports none for it\n";
    } else if (j.status == JobStatus::running) {
      std::cout << "no batch system details: the site does not report them for this job\n";
    } else {
      std::cout << "no batch system details yet (the job is " << to_string(j.status)
                << " and has not reached the batch system)\n";
    }
    return;
  }
  std::cout << "batch id:    " << d.batch_job_id << "\n"
            << "state:       " << d.job_state << "\n"
            << "batch host:  " << (d.batch_host.empty() ? "-" : d.batch_host) << "\n"
            << "nodes:       " << joined(d.nodes, " ") << "\n";
  for (const auto& [k, v] : d.raw) std::cout << "  " << k << "=" << v << "\n";
}

void cmd_ls(const CliOptions& o, const std::string& id, const std::string& path) {
  Session s(o);
  JobInfo j = s.job_info(id);
  std::string storage = s.client->working_directory(j);
  FileInfo f =
      must(run_sync<FileInfo>(s.io, [&](auto cb) { s.client->stat(s.creds, storage, path, cb); }));
  if (s.json) {
    nlohmann::json entries = nlohmann::json::array();
    for (const auto& e : f.content)
      entries.push_back({{"path", e.path}, {"isDirectory", e.is_directory}, {"size", e.size}});
    print_json({{"path", f.path},
                {"isDirectory", f.is_directory},
                {"size", f.size},
                {"permissions", f.permissions},
                {"owner", f.owner},
                {"content", entries}});
    return;
  }
  if (!f.is_directory) {
    std::cout << "-  " << f.size << "  " << (f.permissions.empty() ? "" : f.permissions + "  ")
              << (f.path.empty() ? path : f.path) << "\n";
    return;
  }
  for (const auto& e : f.content)
    std::cout << (e.is_directory ? "d  " : "-  ") << e.size << "  " << e.path << "\n";
}

void cmd_cat(const CliOptions& o, const std::string& id, const std::string& path) {
  Session s(o);
  JobInfo j = s.job_info(id);
  std::string storage = s.client->working_directory(j);
  Download d = must(run_sync<Download>(
      s.io, [&](auto cb) { s.client->download(s.creds, storage, path, std::nullopt, cb); }));
  std::cout.write(d.bytes.data(), static_cast<std::streamsize>(d.bytes.size()));
  std::cout.flush();
}

void cmd_action(const CliOptions& o, const std::string& id, bool remove) {
  Session s(o);
  std::string url = s.job(id);
  must(run_sync<Done>(s.io, [&](auto cb) {
    if (remove)
      s.client->remove(s.creds, url, cb);
    else
      s.client->abort(s.creds, url, cb);
  }));
  if (s.json) return print_json({{"job", url}, {"action", remove ? "deleted" : "aborted"}});
  std::cout << (remove ? "deleted " : "aborted ") << url << "\n";
}

struct SubmitArgs {
  std::string executable;
  std::vector<std::string> args;
  std::vector<std::string> env;
  std::string queue, runtime, project, name;
  int nodes = 0;
  int gpus = -1;
  std::vector<std::string> tags;
};

void cmd_submit(const CliOptions& o, const SubmitArgs& a) {
  Session s(o);
  JobDescription d;
  d.executable = a.executable;
  d.arguments = a.args;
  for (const auto& kv : a.env) {
    auto eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) usage_error("--env wants NAME=VALUE, got '" + kv + "'");
    d.environment[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  if (!a.queue.empty()) d.resources.queue = a.queue;
  if (!a.runtime.empty()) d.resources.runtime = a.runtime;
  if (!a.project.empty()) d.resources.project = a.project;
  if (a.nodes > 0) d.resources.nodes = a.nodes;
  if (a.gpus >= 0) d.resources.gpus_per_node = a.gpus;
  if (!a.name.empty()) d.name = a.name;
  d.tags = a.tags;
  std::string url =
      must(run_sync<std::string>(s.io, [&](auto cb) { s.client->submit(s.creds, d, cb); }));
  if (s.json) return print_json({{"job", url}});
  std::cout << url << "\n";
}

}  // namespace

void add_commands(CLI::App& app) {
  auto opts = std::make_shared<CliOptions>();
  CLI::App* uni = app.add_subcommand(
      "unicore",
      "Talk to a UNICORE site by hand: check credentials and the site (info), list, inspect, "
      "submit, abort and delete jobs, list and read the files in a job's working directory.\n"
      "Credentials: a bearer token from --token-file or the environment variable KB_UNICORE_TOKEN, "
      "or --user with --password-file (or KB_UNICORE_PASSWORD); secrets never go on the command "
      "line. Without either, requests are anonymous.\n"
      "JOB is a job id or the job's full URL (which must be on the --url site).\n"
      "Exit status: 0 success, 1 the site refused or failed (the reason is printed), 2 usage or "
      "configuration error.");
  uni->require_subcommand(1);
  uni->add_option("--url", opts->url,
                  "Site base URL, https://<gateway>/<SITE>/rest/core (default: $KB_UNICORE_URL)");
  uni->add_option("--token-file", opts->token_file, "File holding the bearer (OIDC access) token");
  uni->add_option("--user", opts->user, "User name for Basic authentication (test sites)");
  uni->add_option("--password-file", opts->password_file, "File holding the password for --user");
  uni->add_option("--ca-file", opts->ca_file,
                  "PEM bundle of CAs to trust instead of the system bundle");
  uni->add_flag("--insecure", opts->insecure,
                "Do not verify the site's TLS certificate (test sites only!)");
  uni->add_option("--preferences", opts->preferences,
                  "User preferences, e.g. uid:alice,group:proj1,role:user (group = HPC project)");
  uni->add_option("--timeout", opts->timeout_s, "Seconds allowed per request")
      ->capture_default_str();
  uni->add_option("--retries", opts->retries, "Retries of transient failures (5xx, timeouts)")
      ->capture_default_str();
  uni->add_option("--gpu-mode", opts->gpu_mode,
                  "How submit asks for GPUs: gpus_per_node (resource GPUsPerNode) or batch_lines "
                  "(raw #SBATCH header; for sites with the GPUsPerNode bug)")
      ->capture_default_str();
  uni->add_flag("--json", opts->json, "Machine-readable JSON output");

  uni->add_subcommand("info",
                      "Who the site thinks you are (uid, projects, role), server version, queues, "
                      "whether job submission is enabled")
      ->callback([opts] { cmd_info(*opts); });

  auto tags = std::make_shared<std::vector<std::string>>();
  auto jobs = uni->add_subcommand("jobs", "List your jobs (URLs)");
  jobs->add_option("--tags", *tags, "Only jobs with all these tags (comma-separated)");
  jobs->callback([opts, tags] { cmd_jobs(*opts, *tags); });

  auto job_id = std::make_shared<std::string>();
  auto path = std::make_shared<std::string>();

  auto status =
      uni->add_subcommand("status", "A job's status, exit code, and for failed jobs the reason");
  status->add_option("JOB", *job_id, "Job id or URL")->required();
  status->callback([opts, job_id] { cmd_status(*opts, *job_id); });

  auto details =
      uni->add_subcommand("details", "The batch system's view of a job: batch id, state, nodes");
  details->add_option("JOB", *job_id, "Job id or URL")->required();
  details->callback([opts, job_id] { cmd_details(*opts, *job_id); });

  auto ls = uni->add_subcommand(
      "ls", "List a directory in the job's working directory (default: its root)");
  ls->add_option("JOB", *job_id, "Job id or URL")->required();
  ls->add_option("PATH", *path, "Path inside the working directory");
  ls->callback([opts, job_id, path] { cmd_ls(*opts, *job_id, *path); });

  auto cat = uni->add_subcommand(
      "cat", "Print a file from the job's working directory (bytes as they are)");
  cat->add_option("JOB", *job_id, "Job id or URL")->required();
  cat->add_option("PATH", *path, "Path inside the working directory, e.g. stdout")->required();
  cat->callback([opts, job_id, path] { cmd_cat(*opts, *job_id, *path); });

  auto abort = uni->add_subcommand("abort", "Abort a job (it ends FAILED; its files stay)");
  abort->add_option("JOB", *job_id, "Job id or URL")->required();
  abort->callback([opts, job_id] { cmd_action(*opts, *job_id, false); });

  auto del = uni->add_subcommand("delete", "Abort a job and delete it with its working directory");
  del->add_option("JOB", *job_id, "Job id or URL")->required();
  del->callback([opts, job_id] { cmd_action(*opts, *job_id, true); });

  auto sub = std::make_shared<SubmitArgs>();
  auto submit = uni->add_subcommand("submit", "Submit a batch job; prints the job's URL");
  submit
      ->add_option("--executable", sub->executable,
                   "Command line to run (in bash, in the job directory)")
      ->required();
  submit->add_option("--arg", sub->args, "An argument (repeatable)");
  submit->add_option("--env", sub->env, "NAME=VALUE for the job's environment (repeatable)");
  submit->add_option("--queue", sub->queue, "Batch queue (partition)");
  submit->add_option("--runtime", sub->runtime, "Wall time: seconds or 30min, 2h, 1d");
  submit->add_option("--nodes", sub->nodes, "Number of nodes");
  submit->add_option("--project", sub->project, "Project (account) to charge");
  submit->add_option("--gpus", sub->gpus, "GPUs per node");
  submit->add_option("--name", sub->name, "Job name");
  submit->add_option("--tag", sub->tags, "A tag (repeatable)");
  submit->callback([opts, sub] { cmd_submit(*opts, *sub); });
}

}  // namespace kb::unicore
