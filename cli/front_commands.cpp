// The bridge's command-line front doors for users and operators: `kernel` (the kernelspec
// wrapper), `kernelspec install`, `list`, `status`, `stop`, `doctor`. Registered by
// add_front_commands() (called from bridge::add_commands); every callback runs on main's thread.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>

#include "bridge/api_client.hpp"
#include "cli/commands.hpp"
#include "cli/doctor.hpp"
#include "kernelspec/kernel_wrapper.hpp"
#include "kernelspec/kernelspec.hpp"

namespace kb::bridge {

namespace {

using nlohmann::json;

// Resource options as typed on the command line; turned into a WrapperRequest after parsing.
struct ResourceOptions {
  std::string socket, site, kernel, kernel_argv, queue, runtime, project, reservation, qos, memory,
      name;
  int nodes = 0, gpus = -1, lease = 0;
  CLI::Option *kernel_opt = nullptr, *nodes_opt = nullptr, *gpus_opt = nullptr,
              *lease_opt = nullptr;

  void add_to(CLI::App& cmd, bool with_label = true) {
    cmd.add_option("--socket", socket,
                   "the daemon's control socket (default $KERNEL_BRIDGE_SOCKET or "
                   "/run/kernel-bridge/api.sock)");
    cmd.add_option("--site", site, "the [[site]] name in the bridge's configuration")->required();
    kernel_opt = cmd.add_option(
        "--kernel", kernel,
        "a kernel named in the site's [site.kernels] (default: the site's default_kernel)");
    cmd.add_option("--kernel-argv", kernel_argv,
                   "the kernel's command line on the compute node, with {connection_file}: words, "
                   "or a JSON array");
    cmd.add_option("--partition,--queue", queue, "batch partition (UNICORE queue)");
    nodes_opt = cmd.add_option("--nodes", nodes, "number of nodes")->check(CLI::Range(1, 100000));
    gpus_opt = cmd.add_option("--gpus", gpus, "GPUs per node")->check(CLI::Range(0, 1024));
    cmd.add_option("--runtime", runtime, "walltime, e.g. 2h, 90m, 1d12h");
    cmd.add_option("--project", project, "project (accounting) to charge");
    cmd.add_option("--reservation", reservation, "batch reservation");
    cmd.add_option("--qos", qos, "quality of service");
    cmd.add_option("--memory", memory, "memory per node, e.g. 16G");
    // kernelspec install has its own --name (the kernelspec's); its kernels are labelled with it.
    if (with_label) cmd.add_option("--name", name, "a label shown by `kernel-bridge list`");
    lease_opt =
        cmd.add_option(
               "--lease", lease,
               "seconds without a word from the wrapper after which the daemon shuts the kernel "
               "down, so that a killed wrapper leaves no job behind (default " +
                   std::to_string(kDefaultWrapperLease) + ")")
            ->check(CLI::Range(5, 86400));
  }

  WrapperRequest request() const {
    WrapperRequest r;
    r.socket = socket;
    r.site = site;
    if (kernel_opt && kernel_opt->count()) r.kernel = kernel;
    if (!kernel_argv.empty()) r.kernel_argv = split_command_line(kernel_argv);
    if (!queue.empty()) r.queue = queue;
    if (nodes_opt && nodes_opt->count()) r.nodes = nodes;
    if (gpus_opt && gpus_opt->count()) r.gpus = gpus;
    if (!runtime.empty()) r.runtime = runtime;
    if (!project.empty()) r.project = project;
    if (!reservation.empty()) r.reservation = reservation;
    if (!qos.empty()) r.qos = qos;
    if (!memory.empty()) r.memory = memory;
    r.name = name;
    if (lease_opt && lease_opt->count()) r.lease = lease;
    return r;
  }
};

[[noreturn]] void fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "kernel-bridge: %s\n", message.c_str());
  throw ExitStatus{code};
}

std::string s(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

std::string job_of(const json& k) {
  return k.contains("job") && k["job"].is_object() ? s(k["job"], "id") : "";
}

// Last state change's time, as "HH:MM:SS" when today, else the full stamp.
std::string since_of(const json& k) {
  if (!k.contains("history") || !k["history"].is_array() || k["history"].empty()) return "";
  std::string at = s(k["history"].back(), "at");
  return at.size() >= 19 ? at.substr(11, 8) : at;
}

void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width;
  for (const auto& row : rows) {
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (width.size() <= i) width.push_back(0);
      width[i] = std::max(width[i], row[i].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(width[i] - row[i].size() + 2, ' ');
    }
    std::cout << line << "\n";
  }
}

ControlResponse call(const std::string& socket, const std::string& method,
                     const std::string& target, const json* body = nullptr,
                     std::chrono::seconds timeout = std::chrono::seconds(30)) {
  try {
    return ControlClient(socket.empty() ? ControlClient::default_socket() : socket)
        .request(method, target, body, timeout);
  } catch (const ControlUnreachable& e) {
    fail(e.what());
  }
}

void print_status(const json& k) {
  auto line = [](const std::string& key, const std::string& value) {
    if (!value.empty()) std::cout << key << ": " << value << "\n";
  };
  line("id", s(k, "id"));
  line("owner", s(k, "owner"));
  line("name", s(k, "name"));
  line("site", s(k, "site"));
  line("state", s(k, "state"));
  line("end cause", s(k, "end_cause"));
  line("reason", s(k, "reason"));
  line("exit code", s(k, "exit_code"));
  line("exit signal", s(k, "exit_signal"));
  line("job", job_of(k));
  if (k.contains("job") && k["job"].is_object()) line("job url", s(k["job"], "url"));
  line("node", s(k, "node"));
  line("walltime end", s(k, "walltime_end"));
  if (k.contains("resources") && k["resources"].is_object() && !k["resources"].empty()) {
    std::string r;
    for (auto it = k["resources"].begin(); it != k["resources"].end(); ++it) {
      r += (r.empty() ? "" : ", ") + it.key() + "=" +
           (it->is_string() ? it->get<std::string>() : it->dump());
    }
    line("resources", r);
  }
  if (k.contains("kernel_argv") && k["kernel_argv"].is_array()) {
    std::string a;
    for (const auto& w : k["kernel_argv"])
      a += (a.empty() ? "" : " ") + (w.is_string() ? w.get<std::string>() : w.dump());
    line("kernel argv", a);
  }
  if (k.contains("connection") && k["connection"].is_object()) {
    const json& c = k["connection"];
    line("endpoints", s(c, "ip") + " shell " + s(c, "shell_port") + ", iopub " +
                          s(c, "iopub_port") + ", stdin " + s(c, "stdin_port") + ", control " +
                          s(c, "control_port") + ", hb " + s(c, "hb_port"));
  }
  line("restarts", s(k, "restarts"));
  line("link reconnects", s(k, "link_reconnects"));
  line("created", s(k, "created_at"));
  if (k.contains("history") && k["history"].is_array()) {
    std::cout << "history:\n";
    for (const auto& h : k["history"])
      std::cout << "  " << s(h, "at") << "  " << s(h, "state") << "\n";
  }
  if (k.contains("progress") && k["progress"].is_array() && !k["progress"].empty()) {
    std::cout << "progress:\n";
    for (const auto& p : k["progress"])
      std::cout << "  " << s(p, "at") << "  " << s(p, "message") << "\n";
  }
}

// `kernel CONNECTION_FILE`: the kernelspec wrapper (kernelspec/kernel_wrapper.hpp).
void add_kernel_command(CLI::App& app) {
  auto opts = std::make_shared<ResourceOptions>();
  auto file = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand(
      "kernel",
      "Run a remote kernel for Jupyter (used as a kernelspec's argv): reads Jupyter's connection "
      "file, asks the daemon for the kernel on exactly those ports with that key, reports "
      "progress on stderr, lives as long as the kernel. SIGINT interrupts it, SIGTERM shuts it "
      "down.");
  opts->add_to(*cmd);
  cmd->add_option("connection_file", *file, "Jupyter's connection file")->required();
  cmd->callback([opts, file] {
    WrapperRequest request;
    try {
      request = opts->request();
    } catch (const std::exception& e) {
      fail(e.what(), 2);
    }
    const int status = run_kernel_wrapper(request, *file);
    if (status != 0) throw ExitStatus{status};
  });
}

// `kernelspec install`: writes a kernelspec whose argv runs `kernel-bridge kernel`.
void add_kernelspec_command(CLI::App& app) {
  auto* ks = app.add_subcommand(
      "kernelspec", "Manage Jupyter kernelspecs that run kernels through kernel-bridge");
  ks->require_subcommand(1);
  auto opts = std::make_shared<ResourceOptions>();
  auto spec = std::make_shared<KernelspecInstall>();
  auto user = std::make_shared<bool>(false);
  auto* install = ks->add_subcommand("install",
                                     "Write <jupyter data dir>/kernels/NAME/kernel.json whose "
                                     "argv runs `kernel-bridge kernel …`");
  install->add_option("--name", spec->name, "kernel name (letters, digits, '.', '_', '-')")
      ->required();
  install->add_option("--display-name", spec->display_name, "name shown in Jupyter's launcher");
  install->add_option("--language", spec->language, "the kernel's language")->capture_default_str();
  install->add_option("--executable", spec->executable,
                      "kernel-bridge's path in argv (default: this executable)");
  auto* u = install->add_flag("--user", *user, "install into your Jupyter data dir (the default)");
  auto* p =
      install->add_option("--prefix", spec->prefix, "install into PREFIX/share/jupyter/kernels");
  auto* j = install->add_option(
      "--jupyter-path", spec->jupyter_path,
      "install into DIR/kernels (DIR is a Jupyter data dir, as listed in JUPYTER_PATH)");
  u->excludes(p)->excludes(j);
  p->excludes(j);
  opts->add_to(*install, /*with_label=*/false);
  install->callback([opts, spec] {
    try {
      KernelspecInstall s = *spec;
      s.request = opts->request();
      s.request.name = validate_kernel_name(s.name);
      const std::string dir = install_kernelspec(s);
      std::cout << "Installed kernelspec " << validate_kernel_name(s.name) << " in " << dir << "\n";
    } catch (const KernelspecError& e) {
      fail(e.what(), 2);
    }
  });
}

// `list`: the caller's kernels as a table (or JSON).
void add_list_command(CLI::App& app) {
  auto socket = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  auto all = std::make_shared<bool>(false);
  auto* cmd = app.add_subcommand("list", "List your kernels (an admin sees everyone's)");
  cmd->add_option("--socket", *socket, "the daemon's control socket");
  cmd->add_flag("--json", *as_json, "print the API's JSON");
  cmd->add_flag("--all", *all, "also show ended kernels");
  cmd->callback([socket, as_json, all] {
    auto res = call(*socket, "GET", "/v1/kernels");
    if (!res.ok()) fail(res.error_message());
    json kernels =
        res.body.is_object() && res.body.contains("kernels") ? res.body["kernels"] : json::array();
    if (!*all) {
      json live = json::array();
      for (const auto& k : kernels)
        if (s(k, "state") != "ended") live.push_back(k);
      kernels = live;
    }
    if (*as_json) {
      std::cout << json{{"kernels", kernels}}.dump(2) << "\n";
      return;
    }
    if (kernels.empty()) {
      std::cout << (*all ? "no kernels\n" : "no running kernels (--all shows ended ones)\n");
      return;
    }
    std::vector<std::vector<std::string>> rows{
        {"ID", "OWNER", "SITE", "STATE", "SINCE", "JOB", "NODE", "NAME", "REASON"}};
    for (const auto& k : kernels) {
      rows.push_back({s(k, "id"), s(k, "owner"), s(k, "site"), s(k, "state"), since_of(k),
                      job_of(k), s(k, "node"), s(k, "name"),
                      s(k, "state") == "ended" ? s(k, "reason") : ""});
    }
    print_table(rows);
  });
}

// `status ID`: one kernel in full.
void add_status_command(CLI::App& app) {
  auto socket = std::make_shared<std::string>();
  auto id = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  auto* cmd = app.add_subcommand(
      "status", "Show one kernel: state, reason, job, node, walltime end, history");
  cmd->add_option("--socket", *socket, "the daemon's control socket");
  cmd->add_flag("--json", *as_json, "print the API's JSON");
  cmd->add_option("id", *id, "kernel id (from `kernel-bridge list`)")->required();
  cmd->callback([socket, id, as_json] {
    auto res = call(*socket, "GET", "/v1/kernels/" + url_segment(*id));
    if (res.status == 404)
      fail("no kernel " + *id + " (or it is not yours); `kernel-bridge list` shows yours");
    if (!res.ok()) fail(res.error_message());
    if (*as_json)
      std::cout << res.body.dump(2) << "\n";
    else
      print_status(res.body);
  });
}

// `stop ID`: shuts a kernel down and waits for it to end.
void add_stop_command(CLI::App& app) {
  auto socket = std::make_shared<std::string>();
  auto id = std::make_shared<std::string>();
  auto no_wait = std::make_shared<bool>(false);
  auto as_json = std::make_shared<bool>(false);
  auto timeout = std::make_shared<int>(60);
  auto* cmd = app.add_subcommand("stop", "Shut a kernel down in order (kernel, agent and job end)");
  cmd->add_option("--socket", *socket, "the daemon's control socket");
  cmd->add_flag("--no-wait", *no_wait, "return once the daemon accepted the shutdown");
  cmd->add_flag("--json", *as_json, "print the kernel's final JSON");
  cmd->add_option("--timeout", *timeout, "seconds to wait for the kernel to end")
      ->capture_default_str();
  cmd->add_option("id", *id, "kernel id (from `kernel-bridge list`)")->required();
  cmd->callback([socket, id, no_wait, as_json, timeout] {
    const std::string path = "/v1/kernels/" + url_segment(*id);
    auto res = call(*socket, "DELETE", path);
    if (res.status == 404)
      fail("no kernel " + *id + " (or it is not yours); `kernel-bridge list` shows yours");
    if (!res.ok()) fail(res.error_message());
    json view = res.body;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(*timeout);
    while (!*no_wait && s(view, "state") != "ended" &&
           std::chrono::steady_clock::now() < deadline) {
      auto left = std::chrono::duration_cast<std::chrono::seconds>(
          deadline - std::chrono::steady_clock::now());
      const long wait = std::max<long>(1, std::min<long>(left.count(), 30));
      auto r = call(*socket, "GET",
                    path + "?wait=" + std::to_string(wait) + "s&after=" + s(view, "version"),
                    nullptr, std::chrono::seconds(wait + 15));
      if (!r.ok() || !r.body.is_object()) break;
      view = r.body;
    }
    if (*as_json) {
      std::cout << view.dump(2) << "\n";
    } else if (s(view, "state") == "ended") {
      std::cout << "kernel " << *id << " ended (" << s(view, "end_cause") << ")"
                << (s(view, "reason").empty() ? "" : ": " + s(view, "reason")) << "\n";
    } else {
      std::cout << "kernel " << *id << " is shutting down (state " << s(view, "state") << ")\n";
    }
    if (!*no_wait && s(view, "state") != "ended") throw ExitStatus{1};
  });
}

// `doctor`: checks a deployment (cli/doctor.hpp).
void add_doctor_command(CLI::App& app) {
  auto options = std::make_shared<DoctorOptions>();
  auto* cmd = app.add_subcommand(
      "doctor",
      "Check a deployment: configuration, UNICORE reachability and credentials, SSH host key and "
      "login, the agent on the site. One PASS/FAIL line per check; exit 1 if any failed.");
  cmd->add_option("--config", options->config_file, "the bridge's configuration file")
      ->default_val("/etc/kernel-bridge/kernel-bridge.toml");
  cmd->add_option("--site", options->site, "check only this site");
  cmd->add_option(
      "--token-file", options->token_file,
      "a file holding a user's UNICORE access token (or set KERNEL_BRIDGE_UNICORE_TOKEN)");
  cmd->add_option("--socket", options->socket,
                  "the daemon's socket to probe (default: the config's)");
  cmd->add_option("--timeout", options->timeout_seconds, "seconds per network check")
      ->capture_default_str();
  cmd->callback([options] {
    if (run_doctor(*options, std::cout) > 0) throw ExitStatus{1};
  });
}

}  // namespace

void add_front_commands(CLI::App& app) {
  add_kernel_command(app);
  add_kernelspec_command(app);
  add_list_command(app);
  add_status_command(app);
  add_stop_command(app);
  add_doctor_command(app);
}

}  // namespace kb::bridge
