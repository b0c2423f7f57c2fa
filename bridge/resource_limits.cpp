// What a request may ask for on a site: the defaults that fill its gaps and the limits it must stay
// within — the site's ([site.defaults], [site.limits]) and, per queue, its partition's
// ([[site.partitions]]). Every refusal names the limit and, for a partition's, the partition.
#include <algorithm>

#include "bridge/config.hpp"

namespace kb::bridge {

const PartitionConfig* find_partition(const SiteConfig& site, std::string_view name) {
  for (const auto& p : site.partitions) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

std::vector<std::string> allowed_queues(const SiteConfig& site) {
  if (site.partitions.empty()) return site.limits.queues;
  std::vector<std::string> names;
  for (const auto& p : site.partitions) names.push_back(p.name);
  return names;
}

ResourceLimits effective_limits(const SiteConfig& site, const std::optional<std::string>& queue) {
  ResourceLimits l = site.limits;
  l.queues = allowed_queues(site);
  const PartitionConfig* p = queue ? find_partition(site, *queue) : nullptr;
  if (!p) return l;
  if (p->limits.max_nodes) l.max_nodes = p->limits.max_nodes;
  if (p->limits.max_gpus) l.max_gpus = p->limits.max_gpus;
  if (p->limits.max_runtime) l.max_runtime = p->limits.max_runtime;
  if (p->limits.max_memory) l.max_memory = p->limits.max_memory;
  return l;
}

void apply_defaults(const SiteConfig& site, ResourceRequest& r) {
  const ResourceDefaults& d = site.defaults;
  if (!r.queue) r.queue = d.queue;
  if (const PartitionConfig* p = r.queue ? find_partition(site, *r.queue) : nullptr) {
    if (!r.nodes) r.nodes = p->defaults.nodes;
    if (!r.gpus) r.gpus = p->defaults.gpus;
    if (!r.runtime) r.runtime = p->defaults.runtime;
    if (!r.memory) r.memory = p->defaults.memory;
  }
  if (!r.nodes) r.nodes = d.nodes;
  if (!r.gpus) r.gpus = d.gpus;
  if (!r.runtime) r.runtime = d.runtime;
  if (!r.project) r.project = d.project;
  if (!r.reservation) r.reservation = d.reservation;
  if (!r.qos) r.qos = d.qos;
  if (!r.memory) r.memory = d.memory;
}

namespace {

std::string joined(const std::vector<std::string>& list) {
  std::string out;
  for (const auto& item : list) out += (out.empty() ? "" : ", ") + item;
  return out;
}

}  // namespace

std::optional<LimitViolation> validate_request(const SiteConfig& site,
                                               const KernelRequest& request) {
  const ResourceRequest& r = request.resources;
  const ResourceLimits l = effective_limits(site, r.queue);
  const PartitionConfig* partition = r.queue ? find_partition(site, *r.queue) : nullptr;
  // "the site's max_nodes 4", or "partition gpus's max_nodes 2" where the partition sets it.
  auto whose = [&](const auto& partition_limit) {
    return partition && partition_limit ? "partition " + partition->name + "'s"
                                        : std::string("the site's");
  };
  if (r.queue && !l.queues.empty() &&
      std::find(l.queues.begin(), l.queues.end(), *r.queue) == l.queues.end()) {
    return LimitViolation{"resources.queue", site.partitions.empty() ? "queues" : "partitions",
                          "queue \"" + *r.queue + "\" is not allowed on site " + site.name +
                              " (allowed: " + joined(l.queues) + ")"};
  }
  if (r.reservation && !site.reservations.empty() &&
      std::find(site.reservations.begin(), site.reservations.end(), *r.reservation) ==
          site.reservations.end()) {
    return LimitViolation{"resources.reservation", "reservations",
                          "reservation \"" + *r.reservation + "\" is not offered on site " +
                              site.name + " (offered: " + joined(site.reservations) + ")"};
  }
  if (r.nodes && *r.nodes < 1) {
    return LimitViolation{"resources.nodes", "min_nodes", "nodes must be at least 1"};
  }
  if (r.nodes && l.max_nodes && *r.nodes > *l.max_nodes) {
    return LimitViolation{"resources.nodes", "max_nodes",
                          "nodes " + std::to_string(*r.nodes) + " exceeds " +
                              whose(partition ? partition->limits.max_nodes : std::nullopt) +
                              " max_nodes " + std::to_string(*l.max_nodes)};
  }
  if (r.gpus && *r.gpus < 0) {
    return LimitViolation{"resources.gpus", "min_gpus", "gpus must not be negative"};
  }
  if (r.gpus && l.max_gpus && *r.gpus > *l.max_gpus) {
    return LimitViolation{"resources.gpus", "max_gpus",
                          "gpus " + std::to_string(*r.gpus) + " exceeds " +
                              whose(partition ? partition->limits.max_gpus : std::nullopt) +
                              " max_gpus " + std::to_string(*l.max_gpus)};
  }
  if (r.runtime && r.runtime->count() <= 0) {
    return LimitViolation{"resources.runtime", "min_runtime", "runtime must be longer than 0s"};
  }
  if (r.runtime && l.max_runtime && *r.runtime > *l.max_runtime) {
    return LimitViolation{"resources.runtime", "max_runtime",
                          "runtime " + format_duration(*r.runtime) + " exceeds " +
                              whose(partition ? partition->limits.max_runtime : std::nullopt) +
                              " max_runtime " + format_duration(*l.max_runtime)};
  }
  if (r.memory && l.max_memory && *r.memory > *l.max_memory) {
    return LimitViolation{"resources.memory", "max_memory",
                          "memory " + format_size(*r.memory) + " exceeds " +
                              whose(partition ? partition->limits.max_memory : std::nullopt) +
                              " max_memory " + format_size(*l.max_memory)};
  }
  return std::nullopt;
}

}  // namespace kb::bridge
