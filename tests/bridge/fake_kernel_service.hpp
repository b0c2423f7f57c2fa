#pragma once
// FakeKernelService: an in-memory KernelService for the control API's tests. It records what the
// API asked for and lets a test move kernels through states. Test-only; io_context thread only.
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bridge/kernel_service.hpp"

namespace kb::bridge::test {

class FakeKernelService : public KernelService {
 public:
  struct Call {
    std::string action;  // "interrupt", "restart", "remove"
    std::string id;
    std::string by;  // caller.user
  };

  void create(const Caller& caller, KernelRequest request, CreateCallback done) override {
    if (next_create_error) {
      ServiceError error = *next_create_error;
      next_create_error.reset();
      return done(error);
    }
    last_request = request;
    KernelView v;
    v.id = "k" + std::to_string(++counter_);
    v.owner = caller.user;
    v.site = request.site;
    v.name = request.name;
    v.tags = request.tags;
    v.kernel_argv = request.kernel_argv;
    v.kernel_name = request.kernel_name;
    v.resources = request.resources;
    v.hub_ip = request.connection.ip;
    v.shell_port = request.connection.shell_port;
    v.iopub_port = request.connection.iopub_port;
    v.stdin_port = request.connection.stdin_port;
    v.control_port = request.connection.control_port;
    v.hb_port = request.connection.hb_port;
    v.created_at = Clock::now();
    v.history.push_back({KernelState::requested, v.created_at});
    v.version = 1;
    kernels_[v.id] = v;
    done(v);
  }

  std::vector<KernelView> list() const override {
    // A handler that fails unexpectedly (a bug the control API must survive).
    if (list_throws) throw std::runtime_error("fake: list() failed");
    std::vector<KernelView> out;
    for (const auto& [id, v] : kernels_) out.push_back(v);
    return out;
  }

  void watched(std::string_view id) override { ++watches[std::string(id)]; }

  // What the "site" says the user may choose; the last (user, site) asked.
  UserSiteChoices choices;
  std::vector<std::pair<std::string, std::string>> choices_asked;
  std::optional<std::vector<std::string>> projects_known;
  void user_choices(const Caller& caller, const std::string& site, ChoicesCallback done) override {
    choices_asked.emplace_back(caller.user, site);
    done(choices);
  }
  std::optional<std::vector<std::string>> known_projects(const std::string&,
                                                         const std::string&) const override {
    return projects_known;
  }

  std::optional<KernelView> get(std::string_view id) const override {
    auto it = kernels_.find(std::string(id));
    if (it == kernels_.end()) return std::nullopt;
    return it->second;
  }

  void interrupt(const Caller& caller, std::string_view id, ActionCallback done) override {
    act("interrupt", caller, id, std::move(done));
  }
  void restart(const Caller& caller, std::string_view id, ActionCallback done) override {
    act("restart", caller, id, std::move(done));
  }
  void remove(const Caller& caller, std::string_view id, ActionCallback done) override {
    auto it = kernels_.find(std::string(id));
    if (it != kernels_.end() && !next_action_error) {
      set_state(it->first, KernelState::ended, EndCause::shutdown, "stopped by " + caller.user);
    }
    act("remove", caller, id, std::move(done));
  }

  std::vector<HealthCheck> health() const override { return checks; }

  // Test controls.
  void set_state(const std::string& id, KernelState state, EndCause cause = EndCause::none,
                 std::string reason = {}) {
    KernelView& v = kernels_.at(id);
    v.state = state;
    v.end_cause = cause;
    v.reason = std::move(reason);
    v.history.push_back({state, Clock::now()});
    ++v.version;
    notify_changed(v);
  }

  std::vector<Call> calls;
  std::optional<ServiceError> next_create_error;
  bool list_throws = false;
  std::optional<ServiceError> next_action_error;
  std::optional<KernelRequest> last_request;
  std::map<std::string, int> watches;  // watched() calls by kernel id
  std::vector<HealthCheck> checks{{"site demo: unicore", true, ""}};

 private:
  void act(const char* action, const Caller& caller, std::string_view id, ActionCallback done) {
    calls.push_back({action, std::string(id), caller.user});
    if (next_action_error) {
      auto e = *next_action_error;
      next_action_error.reset();
      return done(e);
    }
    done(std::nullopt);
  }

  std::map<std::string, KernelView> kernels_;
  int counter_ = 0;
};

}  // namespace kb::bridge::test
