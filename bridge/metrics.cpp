#include "bridge/metrics.hpp"

#include <charconv>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace kb::bridge {
namespace {

bool valid_metric_name(std::string_view name) {
  if (name.empty()) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool valid_label_name(std::string_view name) {
  if (name.empty() || name.rfind("__", 0) == 0) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

void check_names(const std::string& name, const std::vector<std::string>& labels, bool histogram) {
  if (!valid_metric_name(name)) throw std::invalid_argument("invalid metric name '" + name + "'");
  for (const auto& l : labels) {
    if (!valid_label_name(l) || (histogram && l == "le")) {
      throw std::invalid_argument("invalid label name '" + l + "' for metric " + name);
    }
  }
}

std::string label_block(const std::vector<std::string>& names,
                        const std::vector<std::string>& values, const std::string& extra_name = {},
                        const std::string& extra_value = {}) {
  std::string out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    out += (out.empty() ? "" : ",") + names[i] + "=\"" + escape_label_value(values[i]) + "\"";
  }
  if (!extra_name.empty())
    out += (out.empty() ? "" : ",") + extra_name + "=\"" + extra_value + "\"";
  return out.empty() ? out : "{" + out + "}";
}

}  // namespace

std::string escape_label_value(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string escape_help(std::string_view help) {
  std::string out;
  for (char c : help) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string format_metric_value(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto result = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, result.ptr);
}

void Counter::inc(double amount) {
  if (!(amount >= 0)) return;
  value_.fetch_add(amount, std::memory_order_relaxed);
}

Histogram::Histogram(const std::vector<double>& upper_bounds)
    : bounds_(upper_bounds),
      buckets_(std::make_unique<std::atomic<std::uint64_t>[]>(upper_bounds.size())) {
  for (std::size_t i = 0; i < bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::observe(double value) {
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    if (value <= bounds_[i]) {
      buckets_[i].fetch_add(1, std::memory_order_relaxed);
      break;
    }
  }
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

std::vector<std::uint64_t> Histogram::cumulative_counts() const {
  std::vector<std::uint64_t> out(bounds_.size());
  std::uint64_t running = 0;
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

template <class Metric>
Family<Metric>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                       std::vector<double> buckets)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      buckets_(std::move(buckets)) {}

template <class Metric>
Metric& Family<Metric>::with(const std::vector<std::string>& label_values) {
  if (label_values.size() != label_names_.size()) {
    throw std::invalid_argument("metric " + name_ + " takes " +
                                std::to_string(label_names_.size()) + " label values, got " +
                                std::to_string(label_values.size()));
  }
  std::lock_guard lock(mutex_);
  auto& slot = children_[label_values];
  if (!slot) {
    if constexpr (std::is_same_v<Metric, Histogram>) {
      slot = std::make_unique<Histogram>(buckets_);
    } else {
      slot = std::make_unique<Metric>();
    }
  }
  return *slot;
}

template <class Metric>
void Family<Metric>::for_each(
    const std::function<void(const std::vector<std::string>&, const Metric&)>& f) const {
  std::lock_guard lock(mutex_);
  for (const auto& [labels, metric] : children_) f(labels, *metric);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

MetricsRegistry::Entry* MetricsRegistry::find(const std::string& name) {
  for (auto& [n, entry] : entries_) {
    if (n == name) return &entry;
  }
  return nullptr;
}

CounterFamily& MetricsRegistry::counter(const std::string& name, const std::string& help,
                                        std::vector<std::string> label_names) {
  check_names(name, label_names, false);
  std::lock_guard lock(mutex_);
  if (Entry* e = find(name)) {
    if (e->type != Entry::Type::counter || e->counter->label_names() != label_names) {
      throw std::invalid_argument("metric " + name + " is already registered differently");
    }
    return *e->counter;
  }
  Entry entry{Entry::Type::counter,
              std::make_unique<CounterFamily>(name, help, std::move(label_names)),
              {},
              {}};
  entries_.emplace_back(name, std::move(entry));
  return *entries_.back().second.counter;
}

GaugeFamily& MetricsRegistry::gauge(const std::string& name, const std::string& help,
                                    std::vector<std::string> label_names) {
  check_names(name, label_names, false);
  std::lock_guard lock(mutex_);
  if (Entry* e = find(name)) {
    if (e->type != Entry::Type::gauge || e->gauge->label_names() != label_names) {
      throw std::invalid_argument("metric " + name + " is already registered differently");
    }
    return *e->gauge;
  }
  Entry entry{Entry::Type::gauge,
              {},
              std::make_unique<GaugeFamily>(name, help, std::move(label_names)),
              {}};
  entries_.emplace_back(name, std::move(entry));
  return *entries_.back().second.gauge;
}

HistogramFamily& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                            std::vector<std::string> label_names,
                                            std::vector<double> buckets) {
  check_names(name, label_names, true);
  if (buckets.empty())
    throw std::invalid_argument("histogram " + name + " needs at least one bucket");
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    if (std::isnan(buckets[i]) || (i > 0 && buckets[i] <= buckets[i - 1])) {
      throw std::invalid_argument("histogram " + name + ": buckets must increase strictly");
    }
  }
  if (std::isinf(buckets.back()) && buckets.back() > 0) buckets.pop_back();  // +Inf is implicit
  std::lock_guard lock(mutex_);
  if (Entry* e = find(name)) {
    if (e->type != Entry::Type::histogram || e->histogram->label_names() != label_names) {
      throw std::invalid_argument("metric " + name + " is already registered differently");
    }
    return *e->histogram;
  }
  Entry entry{
      Entry::Type::histogram,
      {},
      {},
      std::make_unique<HistogramFamily>(name, help, std::move(label_names), std::move(buckets))};
  entries_.emplace_back(name, std::move(entry));
  return *entries_.back().second.histogram;
}

void MetricsRegistry::add_collector(std::function<void()> collector) {
  std::lock_guard lock(mutex_);
  collectors_.push_back(std::move(collector));
}

std::string MetricsRegistry::render() const {
  std::vector<std::function<void()>> collectors;
  {
    std::lock_guard lock(mutex_);
    collectors = collectors_;
  }
  for (const auto& c : collectors) c();

  std::lock_guard lock(mutex_);
  std::string out;
  for (const auto& item : entries_) {
    // Not a structured binding: lambdas below use the name, and clang (the fuzz build) does not
    // let a lambda capture a structured binding before C++20's P1091 is implemented.
    const std::string& name = item.first;
    const Entry& entry = item.second;
    switch (entry.type) {
      case Entry::Type::counter: {
        out += "# HELP " + name + " " + escape_help(entry.counter->help()) + "\n";
        out += "# TYPE " + name + " counter\n";
        const auto& names = entry.counter->label_names();
        entry.counter->for_each([&](const std::vector<std::string>& values, const Counter& c) {
          out += name + label_block(names, values) + " " + format_metric_value(c.value()) + "\n";
        });
        break;
      }
      case Entry::Type::gauge: {
        out += "# HELP " + name + " " + escape_help(entry.gauge->help()) + "\n";
        out += "# TYPE " + name + " gauge\n";
        const auto& names = entry.gauge->label_names();
        entry.gauge->for_each([&](const std::vector<std::string>& values, const Gauge& g) {
          out += name + label_block(names, values) + " " + format_metric_value(g.value()) + "\n";
        });
        break;
      }
      case Entry::Type::histogram: {
        out += "# HELP " + name + " " + escape_help(entry.histogram->help()) + "\n";
        out += "# TYPE " + name + " histogram\n";
        const auto& names = entry.histogram->label_names();
        entry.histogram->for_each([&](const std::vector<std::string>& values, const Histogram& h) {
          // Read count first: a concurrent observe() may make a bucket exceed it by one, never the
          // reverse, so take the max to keep +Inf ≥ every bucket.
          std::uint64_t count = h.count();
          const auto counts = h.cumulative_counts();
          for (std::size_t i = 0; i < counts.size(); ++i) {
            out += name + "_bucket" +
                   label_block(names, values, "le", format_metric_value(h.upper_bounds()[i])) +
                   " " + std::to_string(counts[i]) + "\n";
            count = std::max(count, counts[i]);
          }
          out += name + "_bucket" + label_block(names, values, "le", "+Inf") + " " +
                 std::to_string(count) + "\n";
          out += name + "_sum" + label_block(names, values) + " " + format_metric_value(h.sum()) +
                 "\n";
          out += name + "_count" + label_block(names, values) + " " + std::to_string(count) + "\n";
        });
        break;
      }
    }
  }
  return out;
}

BridgeMetrics::BridgeMetrics(MetricsRegistry& r)
    : registry(r),
      kernels(r.gauge("kb_kernels", "Kernels known to the bridge, by lifecycle state.", {"state"})),
      channel_bytes(r.counter("kb_channel_bytes_total",
                              "Bytes carried over kernel links, by Jupyter channel and direction.",
                              {"channel", "direction"})),
      link_reconnects(r.counter("kb_link_reconnects_total",
                                "Times a kernel's link to its agent was re-established.",
                                {"site"})),
      unicore_latency(r.histogram("kb_unicore_request_duration_seconds",
                                  "Duration of UNICORE REST requests, by site and HTTP method.",
                                  {"site", "method"},
                                  {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30})),
      unicore_errors(r.counter("kb_unicore_request_errors_total",
                               "UNICORE REST requests that failed, by site and kind of error.",
                               {"site", "kind"})),
      api_requests(r.counter("kb_api_requests_total",
                             "Control API requests, by method, route and HTTP status.",
                             {"method", "route", "code"})),
      api_connections_refused(
          r.counter("kb_api_connections_refused_total",
                    "Control API connections refused or dropped by the connection limits.", {})),
      api_internal_errors(r.counter(
          "kb_api_internal_errors_total",
          "Unexpected failures while handling a request or an event (answered 500 or logged).",
          {})),
      up_since(r.gauge("kb_start_time_seconds",
                       "Start time of the bridge, seconds since the Unix epoch.")) {}

}  // namespace kb::bridge
