// GET /v1/sites and GET /v1/sites/{site}/options (docs/control-api.md): what a user may choose on
// a site — its partitions with their ranges and defaults, reservations and kernels (from the
// configuration), and the projects the site itself says the caller may charge (UNICORE's user
// info, through the KernelService's short-lived cache). A front end offers only these; a request
// outside them is refused naming the limit (resource_limits.cpp).
#include <boost/beast/http/status.hpp>

#include "bridge/control_api_impl.hpp"

namespace kb::bridge {
namespace {

namespace http = boost::beast::http;
using json = nlohmann::json;

template <class T>
json opt(const std::optional<T>& v) {
  return v ? json(*v) : json(nullptr);
}

json seconds_opt(const std::optional<std::chrono::seconds>& v) {
  return v ? json(v->count()) : json(nullptr);
}

// One partition's ranges: the effective limits (its own where set, else the site's) and the
// defaults a request on it gets.
json partition_json(const SiteConfig& site, const std::optional<std::string>& name,
                    const std::string& description) {
  const ResourceLimits l = effective_limits(site, name);
  ResourceRequest d;
  d.queue = name;
  apply_defaults(site, d);
  return {{"name", opt(name)},
          {"description", description},
          {"nodes", {{"min", 1}, {"max", opt(l.max_nodes)}, {"default", opt(d.nodes)}}},
          {"gpus_per_node", {{"min", 0}, {"max", opt(l.max_gpus)}, {"default", opt(d.gpus)}}},
          {"runtime_seconds",
           {{"min", 1}, {"max", seconds_opt(l.max_runtime)}, {"default", seconds_opt(d.runtime)}}},
          {"memory_bytes_per_node", {{"max", opt(l.max_memory)}, {"default", opt(d.memory)}}}};
}

}  // namespace

void ControlApi::Impl::list_sites(const Reply& reply) const {
  json sites = json::array();
  for (const auto& s : config.sites) {
    sites.push_back({{"name", s.name}, {"description", s.description}});
  }
  reply(http::status::ok, json{{"sites", std::move(sites)}}, {});
}

void ControlApi::Impl::site_options(const Caller& caller, const std::string& name, Reply reply) {
  const SiteConfig* site = config.find_site(name);
  if (!site) {
    return reply_error(reply, {http::status::not_found,
                               "no site \"" + name + "\" is configured (GET /v1/sites lists them)",
                               "site",
                               {}});
  }
  const std::string user = caller.user;
  // The configuration outlives the API; the reply copes with a connection that is gone.
  kernels.user_choices(caller, name, [site, user, reply](UserSiteChoices choices) {
    json partitions = json::array();
    if (!site->partitions.empty()) {
      for (const auto& p : site->partitions) {
        partitions.push_back(partition_json(*site, p.name, p.description));
      }
    } else {
      // No partitions configured: the allowed queues, else what UNICORE publishes, each with the
      // site's limits; else one entry for the site's default queue.
      std::vector<std::string> names = allowed_queues(*site);
      if (names.empty()) names = choices.queues;
      for (const auto& n : names) partitions.push_back(partition_json(*site, n, ""));
      if (names.empty()) {
        partitions.push_back(partition_json(*site, site->defaults.queue, "the site's default"));
      }
    }
    json kernel_names = json::array();
    for (const auto& [k, argv] : site->kernels) kernel_names.push_back(k);
    ResourceRequest defaults;
    apply_defaults(*site, defaults);
    json body{{"site", site->name},
              {"description", site->description},
              {"user", user},
              {"projects", choices.projects},
              {"default_project", defaults.project ? *defaults.project : choices.default_project},
              {"partitions", std::move(partitions)},
              {"default_partition", opt(defaults.queue)},
              {"reservations", site->reservations},
              {"kernels", std::move(kernel_names)},
              {"default_kernel", site->default_kernel},
              {"fetched_at", format_time_utc(choices.fetched_at)}};
    if (!choices.note.empty()) body["projects_note"] = choices.note;
    reply(http::status::ok, body, {});
  });
}

}  // namespace kb::bridge
