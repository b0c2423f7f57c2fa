#include "kernelspec/kernel_wrapper.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "bridge/api_client.hpp"
#include "bridge/api_forms.hpp"
#include "link/connection_file.hpp"

namespace kb::bridge {

namespace {

using nlohmann::json;

void say(const std::string& message) {
  // One write per line: Jupyter interleaves our stderr with its own log.
  const std::string line = progress_line(message) + "\n";
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

std::string str(const json& j, const char* key) {
  auto it = j.find(key);
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
}

std::string job_id_of(const json& view) {
  auto it = view.find("job");
  return (it != view.end() && it->is_object()) ? str(*it, "id") : std::string();
}

// What the wrapper has told the user so far, so each fact is printed once.
struct Reported {
  std::size_t history = 0;
  std::set<std::string> progress;  // "<at> <message>"
  std::string job, node, queue;
};

void report_changes(const json& view, Reported& seen) {
  if (auto h = view.find("history"); h != view.end() && h->is_array()) {
    for (std::size_t i = seen.history; i < h->size(); ++i) {
      const json& e = (*h)[i];
      // The end's reason is printed once, with the exit status, when the wrapper exits.
      say("kernel " + str(view, "id") + " " + str(e, "state") + " (at " + str(e, "at") + ")");
    }
    seen.history = h->size();
  }
  const std::string job = job_id_of(view);
  if (!job.empty() && job != seen.job) {
    seen.job = job;
    say("kernel " + str(view, "id") + " job " + job);
  }
  std::string queue;
  if (auto r = view.find("resources"); r != view.end() && r->is_object()) queue = str(*r, "queue");
  if (!queue.empty() && queue != seen.queue && !seen.job.empty()) {
    seen.queue = queue;
    say("kernel " + str(view, "id") + " queue " + queue);
  }
  const std::string node = str(view, "node");
  if (!node.empty() && node != seen.node) {
    seen.node = node;
    say("kernel " + str(view, "id") + " node " + node);
  }
  if (auto p = view.find("progress"); p != view.end() && p->is_array()) {
    for (const json& e : *p) {
      std::string key = str(e, "at") + " " + str(e, "message");
      if (seen.progress.insert(key).second)
        say("kernel " + str(view, "id") + ": " + str(e, "message"));
    }
    // The service keeps the most recent lines only; so do we.
    if (seen.progress.size() > 1000) seen.progress.clear();
  }
}

// Shared between the main thread (owns the kernel's life) and the signal thread.
struct WrapperState {
  std::mutex mutex;
  std::string kernel_id;  // empty until the daemon accepted the kernel
  bool shutdown_requested = false;
  bool shutdown_sent = false;
  std::atomic<bool> finished{false};
};

bool send_shutdown(const ControlClient& client, const std::string& id) {
  try {
    auto res = client.request("DELETE", "/v1/kernels/" + url_segment(id), nullptr,
                              std::chrono::seconds(20));
    if (res.ok() || res.status == 404) return true;
    say("shutting kernel " + id + " down failed: " + res.error_message());
  } catch (const ControlUnreachable& e) {
    say(std::string("shutting kernel ") + id + " down failed: " + e.what());
  }
  return false;
}

void signal_loop(const ControlClient& client, WrapperState& state, sigset_t set) {
  while (!state.finished.load()) {
    int sig = 0;
    if (::sigwait(&set, &sig) != 0) continue;
    if (state.finished.load()) return;
    std::string id;
    {
      std::lock_guard lock(state.mutex);
      id = state.kernel_id;
      if (sig != SIGINT) state.shutdown_requested = true;
    }
    if (sig == SIGINT) {
      if (id.empty()) {
        say("interrupt ignored: the kernel has not been accepted by the daemon yet");
        continue;
      }
      try {
        auto res = client.request("POST", "/v1/kernels/" + url_segment(id) + "/interrupt", nullptr,
                                  std::chrono::seconds(20));
        if (res.ok())
          say("kernel " + id + " interrupt sent");
        else
          say("interrupting kernel " + id + " failed: " + res.error_message());
      } catch (const ControlUnreachable& e) {
        say(std::string("interrupting kernel ") + id + " failed: " + e.what());
      }
      continue;
    }
    if (sig == SIGUSR1) return;  // the main thread is done: wake-up only
    say(std::string("received ") + (sig == SIGTERM ? "SIGTERM" : "SIGHUP") +
        ": shutting the kernel down");
    if (id.empty()) continue;  // the main thread sends DELETE as soon as it has the id
    bool first = false;
    {
      std::lock_guard lock(state.mutex);
      first = !state.shutdown_sent;
      state.shutdown_sent = true;
    }
    if (first) send_shutdown(client, id);
  }
}

}  // namespace

std::string progress_line(const std::string& message) {
  return format_time_utc(Clock::now()) + " kernel-bridge: " + message;
}

json make_create_request(const WrapperRequest& request, const std::string& connection_file) {
  if (request.site.empty())
    throw KernelspecError("--site is required (the [[site]] name from the bridge's configuration)");
  if (request.kernel && !request.kernel_argv.empty()) {
    throw KernelspecError("give either --kernel or --kernel-argv, not both");
  }
  const tunnel::ConnectionInfo info = tunnel::read_connection_file(connection_file);
  json connection = {{"ip", info.ip},
                     {"transport", info.transport},
                     {"key", info.key},
                     {"signature_scheme", info.signature_scheme}};
  for (auto kind :
       {tunnel::ChannelKind::shell, tunnel::ChannelKind::iopub, tunnel::ChannelKind::stdin_,
        tunnel::ChannelKind::control, tunnel::ChannelKind::hb}) {
    connection[tunnel::port_field(kind)] = info.port(kind);
  }
  if (!info.kernel_name.empty()) connection["kernel_name"] = info.kernel_name;
  json body = {{"site", request.site}, {"connection", connection}};
  if (request.kernel) body["kernel"] = *request.kernel;
  if (!request.kernel_argv.empty()) body["kernel_argv"] = request.kernel_argv;
  json resources = resources_json(request);
  if (!resources.empty()) body["resources"] = resources;
  std::string name = request.name;
  if (name.empty() && !info.kernel_name.empty()) name = info.kernel_name;
  if (!name.empty()) body["name"] = name;
  body["lease"] = request.lease.value_or(kDefaultWrapperLease);
  return body;
}

int exit_status_for(const json& view) {
  const std::string cause = view.contains("end_cause") && view["end_cause"].is_string()
                                ? view["end_cause"].get<std::string>()
                                : std::string();
  if (cause == "shutdown") return 0;
  if (cause == "kernel_exited") {
    if (auto c = view.find("exit_code"); c != view.end() && c->is_number_integer()) {
      const int code = c->get<int>();
      return code >= 0 && code <= 255 ? code : 1;
    }
    if (auto s = view.find("exit_signal"); s != view.end() && s->is_number_integer()) {
      return 128 + (s->get<int>() & 127);
    }
    return 1;
  }
  return 1;
}

int run_kernel_wrapper(const WrapperRequest& request, const std::string& connection_file) {
  const ControlClient client(request.socket.empty() ? ControlClient::default_socket()
                                                    : request.socket);
  json body;
  try {
    body = make_create_request(request, connection_file);
  } catch (const std::exception& e) {
    say(std::string("cannot start the kernel: ") + e.what());
    return 2;
  }

  // The signals we turn into API calls are handled by one thread through sigwait, so no request is
  // ever sent from a signal handler and none is lost while the main thread waits on the daemon.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGUSR1);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  WrapperState state;
  std::thread signals([&client, &state, set] { signal_loop(client, state, set); });
  auto finish = [&](int status) {
    state.finished = true;
    ::pthread_kill(signals.native_handle(), SIGUSR1);
    signals.join();
    return status;
  };

  say("asking the kernel-bridge daemon (" + client.socket_path() + ") for a kernel on site " +
      request.site);
  json view;
  try {
    auto res = client.request("POST", "/v1/kernels", &body, std::chrono::seconds(60));
    if (!res.ok() || !res.body.is_object() || str(res.body, "id").empty()) {
      say("the bridge refused the kernel: " + res.error_message());
      return finish(res.status >= 400 && res.status < 500 ? 2 : 1);
    }
    view = res.body;
  } catch (const ControlUnreachable& e) {
    say(e.what());
    return finish(1);
  }
  const std::string id = str(view, "id");
  bool shutdown_now = false;
  {
    std::lock_guard lock(state.mutex);
    state.kernel_id = id;
    shutdown_now = state.shutdown_requested && !state.shutdown_sent;
    if (shutdown_now) state.shutdown_sent = true;
  }
  say("kernel " + id + " accepted on site " + str(view, "site") + "; Jupyter's endpoints " +
      str(body["connection"], "ip") + ":" +
      std::to_string(body["connection"].value("shell_port", 0)) + "… accept connections now");
  if (shutdown_now) send_shutdown(client, id);

  Reported seen;
  report_changes(view, seen);
  std::uint64_t version = view.value("version", std::uint64_t{0});
  // A daemon restart or a hiccup must not end the kernel for Jupyter at once; a daemon gone for
  // good must (the kernel cannot outlive it), so the wrapper gives up after this long.
  const auto unreachable_limit = std::chrono::seconds(60);
  // Each status request renews the kernel's lease on the daemon; a long poll lasts a third of it at
  // most, so a live wrapper always asks again well before the lease runs out.
  const int lease = body["lease"].get<int>();  // as asked for in the create request
  const std::string wait = std::to_string(std::clamp(lease / 3, 1, 30)) + "s";
  std::optional<std::chrono::steady_clock::time_point> unreachable_since;
  while (true) {
    if (str(view, "state") == "ended") break;
    try {
      auto res = client.request(
          "GET",
          "/v1/kernels/" + url_segment(id) + "?wait=" + wait + "&after=" + std::to_string(version),
          nullptr, std::chrono::seconds(50));
      if (unreachable_since) {
        say("the kernel-bridge daemon answers again");
        unreachable_since.reset();
      }
      if (res.status == 404) {
        say("kernel " + id + " is gone: the daemon no longer knows it (was it restarted?)");
        return finish(1);
      }
      if (!res.ok() || !res.body.is_object()) {
        say("the daemon answered a status request with: " + res.error_message());
        std::this_thread::sleep_for(std::chrono::seconds(1));
        continue;
      }
      view = res.body;
      version = view.value("version", version);
      report_changes(view, seen);
    } catch (const ControlUnreachable& e) {
      const auto now = std::chrono::steady_clock::now();
      if (!unreachable_since) {
        unreachable_since = now;
        say(std::string(e.what()) + " (retrying for " + std::to_string(unreachable_limit.count()) +
            " s)");
      } else if (now - *unreachable_since > unreachable_limit) {
        say("the kernel-bridge daemon stayed unreachable for " +
            std::to_string(unreachable_limit.count()) + " s; giving the kernel up");
        return finish(1);
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
  }
  const int status = exit_status_for(view);
  const std::string cause = view.contains("end_cause") && view["end_cause"].is_string()
                                ? view["end_cause"].get<std::string>()
                                : std::string("unknown");
  if (status == 0) {
    say("kernel " + id + " ended (" + cause + ")");
  } else {
    std::string reason = str(view, "reason");
    say("kernel " + id + " ended (" + cause + ")" + (reason.empty() ? "" : ": " + reason) +
        "; exit status " + std::to_string(status));
  }
  return finish(status);
}

}  // namespace kb::bridge
