#include "cli/doctor.hpp"

#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <ostream>
#include <thread>

#include "bridge/api_client.hpp"
#include "bridge/config.hpp"
#include "bridge/lifecycle_backend.hpp"
#include "common/files.hpp"
#include "ssh/connection.hpp"
#include "store/sqlite_store.hpp"
#include "unicore/http_engine.hpp"

namespace kb::bridge {

namespace {

using nlohmann::json;

struct Report {
  std::ostream& out;
  int failed = 0;
  void pass(const std::string& what, const std::string& detail) {
    out << "PASS  " << what << ": " << detail << "\n";
  }
  void fail(const std::string& what, const std::string& detail, const std::string& todo) {
    ++failed;
    out << "FAIL  " << what << ": " << detail << "\n      → " << todo << "\n";
  }
  void skip(const std::string& what, const std::string& why) {
    out << "SKIP  " << what << ": " << why << "\n";
  }
  void warn(const std::string& what, const std::string& detail) {
    out << "WARN  " << what << ": " << detail << "\n";
  }
};

// One request on a private event loop: the CLI may block, the engine itself never does.
unicore::HttpResponse fetch(unicore::HttpRequest request) {
  boost::asio::io_context io;
  unicore::HttpEngine engine(io);
  unicore::HttpResponse out;
  engine.start(std::move(request), [&out](unicore::HttpResponse r) { out = std::move(r); });
  io.run();
  return out;
}

unicore::HttpRequest base_request(const SiteConfig& site, const std::string& url,
                                  const std::string& token, int timeout_seconds) {
  unicore::HttpRequest r;
  r.url = url;
  r.headers = {"Accept: application/json"};
  if (!token.empty()) r.headers.push_back("Authorization: Bearer " + token);
  r.tls.verify = site.verify_tls;
  r.tls.ca_file = site.ca_file;
  r.connect_timeout = std::chrono::seconds(std::min(timeout_seconds, 10));
  r.total_timeout = std::chrono::seconds(timeout_seconds);
  return r;
}

std::string read_token(const DoctorOptions& options, std::string* source) {
  if (!options.token_file.empty()) {
    std::string token;
    try {
      token = read_small_file(options.token_file, 1024 * 1024);
    } catch (const FileReadError& e) {
      throw std::runtime_error("cannot read the token file " + options.token_file + ": " +
                               e.reason());
    }
    token = token.substr(0, token.find('\n'));
    while (!token.empty() && (token.back() == '\r' || token.back() == ' ')) token.pop_back();
    *source = options.token_file;
    return token;
  }
  if (const char* t = std::getenv("KERNEL_BRIDGE_UNICORE_TOKEN"); t && *t) {
    *source = "$KERNEL_BRIDGE_UNICORE_TOKEN";
    return t;
  }
  return {};
}

std::string error_of(const unicore::HttpResponse& r) {
  json body = json::parse(r.body, nullptr, false);
  if (body.is_object() && body.contains("errorMessage") && body["errorMessage"].is_string()) {
    return "HTTP " + std::to_string(r.status) + ": " + body["errorMessage"].get<std::string>();
  }
  return "HTTP " + std::to_string(r.status);
}

void check_unicore(const SiteConfig& site, const std::string& token,
                   const std::string& token_source, const DoctorOptions& options, Report& report,
                   bool* token_ok) {
  const std::string what = "site " + site.name + ": UNICORE " + site.unicore_url;
  auto anon = fetch(base_request(site, site.unicore_url, "", options.timeout_seconds));
  if (anon.error != unicore::TransportError::none) {
    std::string todo =
        "check unicore_url in " + options.config_file + " and that this host reaches the server";
    if (anon.error == unicore::TransportError::tls)
      todo =
          "check ca_file (the CA that signed the server's certificate) or the server's certificate";
    report.fail(what,
                std::string("not reachable (") + unicore::to_string(anon.error) + ": " +
                    anon.error_message + ")",
                todo);
    return;
  }
  json info = json::parse(anon.body, nullptr, false);
  if (anon.status != 200 || !info.is_object() || !info.contains("server")) {
    report.fail(what, "answers " + error_of(anon) + " without UNICORE's core information",
                "unicore_url must be the REST core base, ending in /rest/core");
    return;
  }
  std::string version = info["server"].value("version", std::string("?"));
  report.pass(what, "reachable, UNICORE " + version);
  const std::string cwhat = "site " + site.name + ": UNICORE credentials";
  if (token.empty()) {
    report.skip(cwhat,
                "no token given; pass --token-file FILE (or set KERNEL_BRIDGE_UNICORE_TOKEN) with "
                "a user's access token");
    return;
  }
  auto authed = fetch(base_request(site, site.unicore_url, token, options.timeout_seconds));
  json me = json::parse(authed.body, nullptr, false);
  if (authed.error != unicore::TransportError::none || authed.status != 200 || !me.is_object()) {
    report.fail(cwhat,
                "the token from " + token_source + " was refused (" +
                    (authed.error != unicore::TransportError::none ? authed.error_message
                                                                   : error_of(authed)) +
                    ")",
                "get a fresh access token; in production the JupyterHub hook pushes it "
                "(docs/operations.md)");
    return;
  }
  std::string role, uid;
  if (me.contains("client") && me["client"].is_object()) {
    const json& c = me["client"];
    if (c.contains("role") && c["role"].is_object())
      role = c["role"].value("selected", std::string());
    if (c.contains("xlogin") && c["xlogin"].is_object())
      uid = c["xlogin"].value("UID", std::string());
  }
  if (role.empty() || role == "anonymous") {
    report.fail(
        cwhat, "the token from " + token_source + " was not accepted (role: anonymous)",
        "the token is not valid for this server; get one from the site's identity provider");
    return;
  }
  *token_ok = true;
  report.pass(cwhat, "token accepted: role " + role + (uid.empty() ? "" : ", login " + uid));
}

void check_ssh(const SiteConfig& site, const DoctorOptions& options, Report& report) {
  for (const auto& host : site.login_hosts) {
    const std::string what = "site " + site.name + ": SSH " + site.ssh_user + "@" + host.str();
    boost::asio::io_context io;
    tunnel::SshOptions ssh = site_ssh_options(site, host);
    ssh.connect_timeout = std::chrono::seconds(options.timeout_seconds);
    auto conn = tunnel::SshConnection::create(io, ssh);
    tunnel::SshConnection::State final_state = tunnel::SshConnection::State::connecting;
    std::string reason;
    conn->on_state_change([&](tunnel::SshConnection::State s, const std::string& why) {
      using S = tunnel::SshConnection::State;
      if (s == S::connected || s == S::failed || s == S::reconnecting) {
        final_state = s;
        reason = why;
        conn->shutdown();
        io.stop();
      }
    });
    conn->connect();
    io.run_for(std::chrono::seconds(options.timeout_seconds + 5));
    using S = tunnel::SshConnection::State;
    if (final_state == S::connected) {
      report.pass(what, "host key matches " + site.known_hosts + ", service key " +
                            site.ssh_identity + " accepted");
    } else {
      if (reason.empty()) reason = conn->last_error();
      if (reason.empty())
        reason = "no answer within " + std::to_string(options.timeout_seconds) + " s";
      std::string todo =
          "check that the login host is reachable from here (address, port, firewall)";
      if (reason.find("host key") != std::string::npos ||
          reason.find("known_hosts") != std::string::npos) {
        todo =
            "verify the login host's key with the site (ssh-keyscan + fingerprint from the site's "
            "docs) and fix " +
            site.known_hosts;
      } else if (reason.find("denied") != std::string::npos ||
                 reason.find("auth") != std::string::npos ||
                 reason.find("refused the key") != std::string::npos) {
        todo = "ask the site to authorize the service key (" + site.ssh_identity +
               ".pub) as restrict,port-forwarding,permitopen=\"<compute nodes>:*\" for " +
               site.ssh_user;
      } else if (reason.find("identity") != std::string::npos) {
        todo =
            "ssh_identity must be an unencrypted OpenSSH private key readable by the bridge (0600)";
      }
      report.fail(what, reason, todo);
    }
    conn->shutdown();
    io.restart();
    io.poll();
  }
}

void check_agent(const SiteConfig& site, const std::string& token, bool token_ok,
                 const DoctorOptions& options, Report& report) {
  const std::string what = "site " + site.name + ": agent";
  if (site.agent.mode == AgentConfig::Mode::upload) {
    if (::access(site.agent.path.c_str(), X_OK) == 0) {
      report.pass(what, "uploaded with each job from " + site.agent.path + " (executable)");
    } else {
      report.fail(what, "upload mode, but " + site.agent.path + " is not an executable file here",
                  "set agent.path to a kernel-bridge binary built for the site's compute nodes");
    }
    return;
  }
  if (!token_ok) {
    report.skip(what, "installed at " + site.agent.path +
                          "; checking it needs a valid UNICORE token (--token-file)");
    return;
  }
  // A short job on the login node tests the path on the site's shared file system (the compute
  // nodes see the same installation at a centre; a node-local install is not visible from here).
  json job = {{"Executable", "test"},
              {"Arguments", json::array({"-x", site.agent.path})},
              {"Job type", "ON_LOGIN_NODE"},
              {"Name", "kernel-bridge-doctor"},
              {"Tags", json::array({"kernel-bridge", "kernel-bridge-doctor"})}};
  auto submit = base_request(site, site.unicore_url + "/jobs", token, options.timeout_seconds);
  submit.method = "POST";
  submit.headers.push_back("Content-Type: application/json");
  submit.body = job.dump();
  submit.send_body = true;
  auto created = fetch(submit);
  const std::string* location = created.header("location");
  if (created.error != unicore::TransportError::none || created.status != 201 || !location) {
    report.fail(what,
                "could not submit the check job (" +
                    (created.error != unicore::TransportError::none ? created.error_message
                                                                    : error_of(created)) +
                    ")",
                "see the UNICORE server's log; the bridge submits the same way");
    return;
  }
  const std::string job_url = *location;
  std::string status, message;
  std::string exit_code;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(options.timeout_seconds * 3);
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = fetch(base_request(site, job_url, token, options.timeout_seconds));
    json j = json::parse(r.body, nullptr, false);
    if (r.status == 200 && j.is_object()) {
      status = j.value("status", std::string());
      message = j.value("statusMessage", std::string());
      if (j.contains("exitCode") && j["exitCode"].is_string())
        exit_code = j["exitCode"].get<std::string>();
      if (status == "SUCCESSFUL" || status == "FAILED") break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  auto del = base_request(site, job_url, token, options.timeout_seconds);
  del.method = "DELETE";
  fetch(del);
  if (status == "SUCCESSFUL") {
    report.pass(what, site.agent.path + " is executable on the site (checked by a login-node job)");
  } else if (status == "FAILED") {
    report.fail(
        what,
        site.agent.path + " is not executable on the site (test -x failed" +
            (exit_code.empty() ? "" : ", exit code " + exit_code) + ")",
        "install kernel-bridge on the site at that path, or use agent = { mode = \"upload\" }");
  } else {
    report.fail(
        what,
        "the check job did not finish (last status " + (status.empty() ? "unknown" : status) + ")",
        "the site's login-node jobs are slow or stuck; check UNICORE's TSI");
  }
}

}  // namespace

// The state database, read-only: a file serve would refuse fails here too, with what to do.
void check_state(const BridgeConfig& config, Report& report) {
  const std::string path = config.state_dir + "/state.db";
  const std::string what = "state database " + path;
  const auto found = store::inspect_sqlite_store(path);
  if (!found.problem.empty()) {
    report.fail(what, found.problem,
                "serve refuses to start with this file: repair or restore it, or start once with "
                "`serve --start-empty` (the file is kept beside it); docs/state.md");
  } else if (!found.exists) {
    report.pass(what, "not there yet: serve creates it (mode 0600) at its first start");
  } else {
    report.pass(what,
                "schema " + std::to_string(found.schema_version) +
                    (found.schema_version < store::kSchemaVersion
                         ? " (serve migrates it to " + std::to_string(store::kSchemaVersion) + ")"
                         : std::string()) +
                    ", " + std::to_string(found.live_kernels) + " live kernel(s) of " +
                    std::to_string(found.kernels) + " recorded, " +
                    std::to_string(found.allocations) + " allocation(s)");
  }
}

int run_doctor(const DoctorOptions& options, std::ostream& out) {
  Report report{out};
  BridgeConfig config;
  try {
    config = load_config(options.config_file);
    report.pass("config " + config.file, std::to_string(config.sites.size()) + " site(s), valid");
  } catch (const ConfigError& e) {
    report.fail("config " + options.config_file, e.what(),
                "fix the file (docs/configuration.md describes every key)");
    return report.failed;
  } catch (const std::exception& e) {
    report.fail("config " + options.config_file, e.what(),
                "fix the file (docs/configuration.md describes every key)");
    return report.failed;
  }

  check_state(config, report);

  const std::string socket = !options.socket.empty() ? options.socket : config.api.unix_socket;
  if (!socket.empty()) {
    try {
      auto res =
          ControlClient(socket).request("GET", "/v1/health", nullptr, std::chrono::seconds(10));
      if (res.ok() && res.body.is_object()) {
        report.pass("daemon on " + socket,
                    "answers, status " + res.body.value("status", std::string("?")));
      } else {
        report.warn("daemon on " + socket, res.error_message());
      }
    } catch (const ControlUnreachable&) {
      report.warn("daemon on " + socket, "not running (start it: systemctl start kernel-bridge)");
    }
  }

  std::string token_source;
  std::string token;
  try {
    token = read_token(options, &token_source);
  } catch (const std::exception& e) {
    report.fail("token", e.what(), "give a readable file with --token-file");
  }
  bool any = false;
  for (const auto& site : config.sites) {
    if (!options.site.empty() && site.name != options.site) continue;
    any = true;
    bool token_ok = false;
    check_unicore(site, token, token_source, options, report, &token_ok);
    check_ssh(site, options, report);
    check_agent(site, token, token_ok, options, report);
  }
  if (!any) {
    std::vector<std::string> names;
    for (const auto& s : config.sites) names.push_back(s.name);
    std::string guess = closest_match(options.site, names);
    report.fail(
        "site " + options.site, "not in " + config.file,
        guess.empty() ? "use one of the configured [[site]] names" : "did you mean " + guess + "?");
  }
  out << (report.failed ? std::to_string(report.failed) + " check(s) failed\n"
                        : "all checks passed\n");
  return report.failed;
}

}  // namespace kb::bridge
