// The kernel lifecycle and its store (docs/state.md): every kernel and allocation is recorded as it
// changes; at start-up restore() brings them back — the hub-side endpoints on the same ports, the
// link to the same agent (which kept its kernel while the bridge was away), the job watched again
// once the owner's UNICORE token is pushed (tokens are never stored) — and detach() stops the
// bridge without ending any kernel.
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <boost/asio/post.hpp>

#include <nlohmann/json.hpp>

#include "bridge/api_forms.hpp"
#include "bridge/lifecycle.hpp"
#include "bridge/lifecycle_state.hpp"

namespace kb::bridge {

namespace asio = boost::asio;

namespace {

using nlohmann::json;

std::int64_t to_ms(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

Clock::time_point from_ms(std::int64_t ms) {
  return Clock::time_point(
      std::chrono::duration_cast<Clock::duration>(std::chrono::milliseconds(ms)));
}

json optional_int(const std::optional<int>& v) {
  return v ? json(*v) : json(nullptr);
}

std::optional<int> read_optional_int(const json& j, const char* key) {
  const auto& v = j.at(key);
  if (v.is_null()) return std::nullopt;
  return v.get<int>();
}

// The view as the store keeps it (not the API's form: times are Unix milliseconds, nothing is
// left out, and it is read back).
json view_to_json(const KernelView& v) {
  json history = json::array();
  for (const auto& h : v.history) history.push_back({std::string(to_string(h.state)), to_ms(h.at)});
  json progress = json::array();
  for (const auto& p : v.progress) progress.push_back({to_ms(p.at), p.message});
  return {{"id", v.id},
          {"owner", v.owner},
          {"site", v.site},
          {"name", v.name},
          {"tags", v.tags},
          {"kernel_argv", v.kernel_argv},
          {"kernel_name", v.kernel_name},
          {"resources", resources_json(v.resources)},
          {"state", std::string(to_string(v.state))},
          {"end_cause", std::string(to_string(v.end_cause))},
          {"reason", v.reason},
          {"exit_code", optional_int(v.exit_code)},
          {"exit_signal", optional_int(v.exit_signal)},
          {"job_id", v.job_id},
          {"job_url", v.job_url},
          {"node", v.node},
          {"walltime_end", v.walltime_end ? json(to_ms(*v.walltime_end)) : json(nullptr)},
          {"hub_ip", v.hub_ip},
          {"ports", {v.shell_port, v.iopub_port, v.stdin_port, v.control_port, v.hb_port}},
          {"restarts", v.restarts},
          {"link_reconnects", v.link_reconnects},
          {"created_ms", to_ms(v.created_at)},
          {"history", std::move(history)},
          {"progress", std::move(progress)}};
}

KernelView view_from_json(const json& j) {
  KernelView v;
  v.id = j.at("id").get<std::string>();
  v.owner = j.at("owner").get<std::string>();
  v.site = j.at("site").get<std::string>();
  v.name = j.at("name").get<std::string>();
  v.tags = j.at("tags").get<std::map<std::string, std::string>>();
  v.kernel_argv = j.at("kernel_argv").get<std::vector<std::string>>();
  v.kernel_name = j.at("kernel_name").get<std::string>();
  if (auto error = parse_resources(j.at("resources"), v.resources)) {
    throw std::runtime_error("resources: " + error->message);
  }
  auto state = kernel_state_from_string(j.at("state").get<std::string>());
  if (!state) throw std::runtime_error("unknown state " + j.at("state").dump());
  v.state = *state;
  auto cause = end_cause_from_string(j.at("end_cause").get<std::string>());
  if (!cause) throw std::runtime_error("unknown end cause " + j.at("end_cause").dump());
  v.end_cause = *cause;
  v.reason = j.at("reason").get<std::string>();
  v.exit_code = read_optional_int(j, "exit_code");
  v.exit_signal = read_optional_int(j, "exit_signal");
  v.job_id = j.at("job_id").get<std::string>();
  v.job_url = j.at("job_url").get<std::string>();
  v.node = j.at("node").get<std::string>();
  if (!j.at("walltime_end").is_null())
    v.walltime_end = from_ms(j["walltime_end"].get<std::int64_t>());
  v.hub_ip = j.at("hub_ip").get<std::string>();
  set_view_ports(v, j.at("ports").get<std::array<std::uint16_t, 5>>());
  v.restarts = j.at("restarts").get<int>();
  v.link_reconnects = j.at("link_reconnects").get<std::uint64_t>();
  v.created_at = from_ms(j.at("created_ms").get<std::int64_t>());
  for (const auto& h : j.at("history")) {
    auto s = kernel_state_from_string(h.at(0).get<std::string>());
    if (!s) throw std::runtime_error("unknown state in history " + h.dump());
    v.history.push_back({*s, from_ms(h.at(1).get<std::int64_t>())});
  }
  for (const auto& p : j.at("progress")) {
    v.progress.push_back({from_ms(p.at(0).get<std::int64_t>()), p.at(1).get<std::string>()});
  }
  return v;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Recording

template <class F>
void KernelLifecycle::with_store(const std::string& what, F&& write) {
  if (!options_.store) return;
  try {
    write(*options_.store);
    if (!store_ok_) {
      spdlog::info("the state database ({}) accepts writes again", options_.store->where());
      store_ok_ = true;
    }
  } catch (const store::StoreError& e) {
    // The kernel goes on; what is lost is only the ability to re-attach it after a crash.
    if (store_ok_) {
      spdlog::error(
          "could not record {} in the state database: {}; kernels keep running, but a "
          "bridge restart now could not re-attach them",
          what, e.what());
    }
    store_ok_ = false;
    store_error_ = e.what();
  }
}

void KernelLifecycle::persist(const Kernel& k) {
  if (!options_.store || detached_) return;
  store::KernelRecord r;
  r.id = k.view.id;
  r.allocation_id = k.alloc ? k.alloc->log_id : std::string();
  r.owner = k.view.owner;
  r.site = k.view.site;
  r.state = to_string(k.view.state);
  r.end_cause = to_string(k.view.end_cause);
  r.reason = k.view.reason;
  r.lease_s = k.lease.count();
  r.view_json = dump_json(view_to_json(k.view));
  r.created_ms = to_ms(k.view.created_at);
  r.updated_ms = to_ms(Clock::now());
  with_store("kernel " + r.id, [&](store::Store& s) { s.put(r); });
}

void KernelLifecycle::persist(const Allocation& alloc) {
  if (!options_.store || detached_) return;
  store::AllocationRecord r;
  r.id = alloc.log_id;
  r.owner = alloc.owner;
  r.site = alloc.site->name;
  r.phase = to_string(alloc.phase);
  r.job_url = alloc.job_url;
  r.job_id = alloc.job_id;
  r.working_dir = alloc.working_dir;
  r.queue = alloc.queue;
  r.node = alloc.node;
  r.agent_host = alloc.agent.host;
  r.agent_port = alloc.agent.port;
  r.agent_hostname = alloc.agent.hostname;
  r.hub_ip = alloc.connection.ip;
  r.ports = alloc.ports;
  r.resources_json = dump_json(resources_json(alloc.resources));
  r.created_ms = to_ms(alloc.created_at);
  r.updated_ms = to_ms(Clock::now());
  r.link_secret_hex = alloc.secret.hex();
  r.jupyter_key = alloc.connection.key;
  r.signature_scheme = alloc.connection.signature_scheme;
  with_store("allocation " + r.id, [&](store::Store& s) { s.put(r); });
}

void KernelLifecycle::unpersist(const Allocation& alloc) {
  if (!options_.store || detached_) return;
  with_store("the release of allocation " + alloc.log_id,
             [&](store::Store& s) { s.remove_allocation(alloc.log_id); });
}

void KernelLifecycle::unpersist(const Kernel& k) {
  if (!options_.store || detached_) return;
  with_store("the removal of kernel " + k.view.id,
             [&](store::Store& s) { s.remove_kernel(k.view.id); });
}

// ------------------------------------------------------------------------------------------------
// Restoring

RestoreSummary KernelLifecycle::restore(const store::Snapshot& snapshot,
                                        std::vector<HandedOver> handed_over) {
  // Every record is read first: one that cannot be read refuses the start (StoreError) before
  // anything is changed, in memory or in the file.
  std::vector<AllocPtr> read_allocations;
  for (const auto& record : snapshot.allocations) {
    read_allocations.push_back(read_allocation(record));
  }
  std::vector<KernelView> views;
  for (const auto& record : snapshot.kernels) {
    try {
      views.push_back(view_from_json(json::parse(record.view_json)));
    } catch (const std::exception& e) {
      throw store::StoreError("kernel " + record.id +
                              " in the state database cannot be read: " + e.what());
    }
  }

  RestoreSummary summary;
  std::map<std::string, tunnel::HubHandover> handovers;  // by allocation id
  for (auto& h : handed_over) handovers.emplace(h.allocation_id, std::move(h.link));
  std::map<std::string, AllocPtr> restored;  // by id
  for (auto& alloc : read_allocations) {
    if (!alloc->site) {
      spdlog::error(
          "[{}] allocation {} in the state database is on a site that is no longer configured: "
          "its job {} is left to end by its agent's no-bridge timeout (or abort it on the site)",
          alloc->log_id, alloc->log_id,
          alloc->job_url.empty() ? std::string("(never submitted)") : alloc->job_url);
      unpersist(*alloc);
      continue;
    }
    allocations_.push_back(alloc);
    restored[alloc->log_id] = alloc;
  }
  for (std::size_t i = 0; i < snapshot.kernels.size(); ++i) {
    const auto& record = snapshot.kernels[i];
    auto alloc = restored.find(record.allocation_id);
    restore_kernel(record, std::move(views[i]), alloc == restored.end() ? nullptr : alloc->second,
                   summary);
  }
  // Kernels are attached; now the allocations move on.
  for (auto& [id, alloc] : restored) {
    if (alloc->link_dead) {  // nothing to re-attach to; its kernel was ended above
      forget(alloc);
      unpersist(*alloc);
      continue;
    }
    Kernel* k = attached(alloc);
    if (!k) {
      ++summary.parked;
      park(alloc);
    }
    std::optional<tunnel::HubHandover> handover;
    if (auto h = handovers.find(id); h != handovers.end()) {
      if (alloc->phase >= AllocationPhase::connecting) {
        handover = std::move(h->second);
        ++summary.handed_over;
      }
      handovers.erase(h);
    }
    reattach(alloc, k, std::move(handover));
  }
  for (auto& [id, h] : handovers) {
    spdlog::warn(
        "[{}] the previous process handed over a link for allocation {}, which the state "
        "database does not list as live; its connections are closed",
        id, id);
    close_handover(h);
  }
  if (!credentials_subscription_) {
    std::weak_ptr<bool> alive = alive_;
    credentials_subscription_ = credentials_.subscribe([this, alive](const std::string& user) {
      if (!alive.expired()) on_credentials(user);
    });
  }
  update_state_gauges();
  return summary;
}

// An allocation from its record, not yet part of the lifecycle: `site` is null when the site is no
// longer configured. Throws StoreError for a record that cannot be read.
KernelLifecycle::AllocPtr KernelLifecycle::read_allocation(const store::AllocationRecord& r) {
  const std::string where = "allocation " + r.id + " in the state database";
  auto alloc = std::make_shared<Allocation>(clock_);
  alloc->log_id = r.id;
  alloc->owner = r.owner;
  try {
    auto phase = allocation_phase_from_string(r.phase);
    if (!phase) throw std::runtime_error("unknown allocation phase \"" + r.phase + "\"");
    alloc->phase = *phase;
    if (auto error = parse_resources(json::parse(r.resources_json), alloc->resources)) {
      throw std::runtime_error("resources: " + error->message);
    }
    kb::auth::Bytes secret;
    if (!kb::auth::from_hex(r.link_secret_hex, secret) ||
        secret.size() != kb::auth::LinkSecret::kSize) {
      throw std::runtime_error("its link secret is not 64 hex characters");
    }
    alloc->secret.bytes = std::move(secret);
  } catch (const std::exception& e) {
    throw store::StoreError(where + " cannot be read: " + e.what());
  }
  auto backend = backends_.find(r.site);
  alloc->site = backend == backends_.end() ? nullptr : config_.find_site(r.site);
  if (!alloc->site) return alloc;
  alloc->backend = backend->second;
  alloc->connection.ip = r.hub_ip;
  set_hub_ports(alloc->connection, r.ports);
  alloc->connection.key = r.jupyter_key;
  alloc->connection.signature_scheme = r.signature_scheme;
  alloc->ports = r.ports;
  alloc->job_url = r.job_url;
  alloc->job_id = r.job_id;
  alloc->working_dir = r.working_dir;
  alloc->queue = r.queue;
  alloc->node = r.node;
  alloc->agent = AgentAddress{r.agent_host, r.agent_port, r.agent_hostname};
  alloc->created_at = from_ms(r.created_ms);
  alloc->reattached = true;
  if (alloc->phase == AllocationPhase::submitting || alloc->job_url.empty()) {
    // The bridge stopped between sending the job and hearing its URL: nothing to re-attach to.
    spdlog::error(
        "[{}] the bridge stopped while it submitted this allocation's job to site {}; if "
        "UNICORE created the job, its agent ends it after the no-bridge timeout",
        r.id, r.site);
    alloc->link_dead = true;
  } else if (alloc->phase >= AllocationPhase::releasing) {
    // It was being released: finish that (reconnect so the agent can be told to stop).
    alloc->phase = AllocationPhase::connecting;
  } else if (alloc->phase >= AllocationPhase::discovering) {
    alloc->job_status = unicore::JobStatus::running;  // no second on_running for a known job
    alloc->running_since = clock_.now();
  }
  if (alloc->phase == AllocationPhase::serving) alloc->phase = AllocationPhase::connecting;
  return alloc;
}

void KernelLifecycle::restore_kernel(const store::KernelRecord& r, KernelView view,
                                     const AllocPtr& alloc, RestoreSummary& summary) {
  Kernel k;
  k.view = std::move(view);
  k.lease = std::chrono::seconds(r.lease_s);
  k.last_watch = clock_.now();  // a full lease from now: its front end may be reconnecting too
  k.ended_at = clock_.now();
  const std::string id = k.view.id;
  auto [it, inserted] = kernels_.emplace(id, std::move(k));
  if (!inserted) return;
  Kernel& kernel = it->second;
  if (!live(kernel.view.state)) {
    ++summary.kept_ended;
    return;
  }
  if (!alloc || alloc->link_dead) {
    ++summary.ended;
    end_kernel(kernel, EndCause::internal,
               alloc ? "the bridge restarted while it submitted the kernel's job; start the kernel "
                       "again"
                     : "the bridge restarted and its state database has no usable allocation for "
                       "this kernel (its site may no longer be configured); start the kernel again",
               {}, {}, false);
    return;
  }
  kernel.alloc = alloc;
  alloc->kernel_id = id;
  if (alloc->phase >= AllocationPhase::connecting) {
    ++summary.reattaching;
    if (kernel.view.state >= KernelState::connecting) set_state(kernel, KernelState::reconnecting);
  } else {
    ++summary.resumed;
  }
}

// The link opens on the recorded ports and reconnects to the recorded agent; the job is watched
// again when its owner's token is there.
void KernelLifecycle::reattach(const AllocPtr& alloc, Kernel* k,
                               std::optional<tunnel::HubHandover> handover) {
  LinkSpec spec;
  spec.kernel_id = alloc->log_id;
  spec.site = alloc->site;
  spec.connection = alloc->connection;
  spec.secret = alloc->secret;
  const bool taken_over = handover.has_value();
  spec.handover = std::move(handover);
  alloc->link = open_link(alloc, spec);
  try {
    alloc->link->listen();
  } catch (const LinkListenError& e) {
    alloc->link_dead = true;
    end_attached(alloc, EndCause::link_failed,
                 std::string("the bridge restarted and cannot listen on the kernel's hub-side "
                             "ports again: ") +
                     e.what() + (taken_over ? "" : "; another program took them"));
    return;
  }
  if (taken_over) {
    // The kernel ran when the previous process stopped; the same link session resumes.
    alloc->handed_over = true;
    alloc->kernel_running = true;
  }
  if (alloc->phase >= AllocationPhase::connecting) {
    if (taken_over && k) {
      progress(*k,
               "the bridge restarted in place: it took over the kernel's connections and "
               "resumes the link session with the agent at " +
                   alloc->agent.host + ":" + std::to_string(alloc->agent.port));
    } else if (k) {
      progress(*k, "the bridge restarted: re-attaching to the agent at " + alloc->agent.host + ":" +
                       std::to_string(alloc->agent.port) + " via " + alloc->link->login_host());
    }
    alloc->link->connect(alloc->agent);
    // An agent that has not answered by the time its no-bridge timeout must have run out (counted
    // from now, later than the old bridge's end) has exited with its kernel: do not hold the ports
    // and list the kernel as re-attaching for ever when no token comes to ask UNICORE why.
    std::weak_ptr<Allocation> weak = alloc;
    std::weak_ptr<bool> alive = alive_;
    alloc->connect_timer.wait(options_.agent_no_bridge_timeout, [this, weak, alive] {
      if (alive.expired()) return;
      auto a = weak.lock();
      if (!a || a->phase >= AllocationPhase::serving || a->releasing()) return;
      end_attached(
          a, EndCause::link_failed,
          "the bridge restarted and the agent of job " + a->job_id + " did not answer within " +
              std::to_string(options_.agent_no_bridge_timeout.count()) +
              " s, its no-bridge timeout: it has stopped the kernel and the job ends" +
              (a->awaiting_token ? " (without a UNICORE token of user " + a->owner +
                                       " the bridge could not ask the site why)"
                                 : std::string()) +
              (a->last_link_error.empty() ? std::string() : "; last error: " + a->last_link_error));
    });
  } else if (k) {
    progress(*k, "the bridge restarted: following job " + alloc->job_id + " again");
  }
  if (credentials_.token(alloc->owner)) {
    resume_job(alloc);
  } else {
    alloc->awaiting_token = true;
    progress(alloc, "the bridge restarted and holds no UNICORE token of user " + alloc->owner +
                        " (tokens are never written to disk): job " + alloc->job_id +
                        "'s status is followed again once JupyterHub pushes one");
  }
}

void KernelLifecycle::resume_job(const AllocPtr& alloc) {
  alloc->awaiting_token = false;
  if (alloc->releasing() || alloc->job_terminal) return;
  watch(alloc);
  if (alloc->phase == AllocationPhase::discovering) {
    alloc->discovery_delay = options_.discovery_initial;
    poll_discovery(alloc);
  }
}

void KernelLifecycle::on_credentials(const std::string& user) {
  for (const auto& alloc : std::vector<AllocPtr>(allocations_)) {
    if (alloc->awaiting_token && alloc->owner == user) {
      progress(alloc,
               "user " + user + "'s token arrived: following job " + alloc->job_id + " again");
      resume_job(alloc);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Stopping without ending

void KernelLifecycle::close_handover(const tunnel::HubHandover& h) {
  for (int fd : h.listeners) {
    if (fd >= 0) ::close(fd);
  }
  for (const auto& st : h.link.streams) {
    if (st.fd >= 0) ::close(st.fd);
  }
}

void KernelLifecycle::hand_over(std::chrono::milliseconds timeout,
                                std::function<void(std::vector<HandedOver>)> done) {
  shutting_down_ = true;
  std::vector<AllocPtr> links;
  for (const auto& alloc : allocations_) {
    if (alloc->link && !alloc->link_dead && !alloc->releasing() &&
        alloc->phase >= AllocationPhase::connecting) {
      links.push_back(alloc);
    }
  }
  struct Gather {
    std::vector<HandedOver> taken;
    std::size_t pending = 0;
    std::function<void(std::vector<HandedOver>)> done;
  };
  auto gather = std::make_shared<Gather>();
  gather->pending = links.size() + 1;  // +1: released once every quiesce has been asked
  gather->done = std::move(done);
  std::weak_ptr<bool> alive = alive_;
  auto one_done = [this, gather, alive] {
    if (--gather->pending != 0) return;
    asio::post(io_, [this, gather, alive] {
      if (alive.expired()) return;
      spdlog::info("{} of {} kernel link(s) quiet and handed over", gather->taken.size(),
                   allocations_.size());
      detach();  // records everything; closes the links that could not be handed over
      gather->done(std::move(gather->taken));
    });
  };
  for (const auto& alloc : links) {
    std::string id = alloc->log_id;
    alloc->link->quiesce(timeout, [gather, one_done, id](std::optional<tunnel::HubHandover> h,
                                                         const std::string& why) {
      if (h) {
        gather->taken.push_back({id, std::move(*h)});
      } else {
        spdlog::warn(
            "[{}] its link cannot be handed over ({}): the next process re-attaches "
            "it with a new link session, and what is in flight may be lost",
            id, why);
      }
      one_done();
    });
  }
  one_done();
}

void KernelLifecycle::detach() {
  shutting_down_ = true;
  for (const auto& [id, k] : kernels_) persist(k);
  for (const auto& alloc : allocations_) persist(*alloc);  // parked ones too
  detached_ = true;
  spdlog::info(
      "stopping with {} allocation(s) left running (bridge.on_stop = keep-kernels): "
      "the next start re-attaches them",
      allocations_.size());
  for (const auto& alloc : allocations_) {
    alloc->discovery_timer.cancel();
    alloc->connect_timer.cancel();
    alloc->grace_timer.cancel();
    alloc->rewatch_timer.cancel();
    if (alloc->watcher) alloc->watcher->stop();
    if (alloc->link) alloc->link->close("the bridge is restarting; it re-attaches when it is back");
  }
}

}  // namespace kb::bridge
