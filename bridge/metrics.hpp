#pragma once
// Metrics: a small Prometheus registry (counters, gauges, histograms with labels) rendered as text
// exposition format 0.0.4 for GET /metrics. Families are registered at start-up; updating a metric
// (inc/set/observe) is lock-free and may happen on any thread. Registration and render() take a
// mutex and may be called from any thread too (render() runs collectors on the calling thread).
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace kb::bridge {

class Counter {
 public:
  void inc(double amount = 1.0);  // amount < 0 is ignored (counters never go down)
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void set(double value) { value_.store(value, std::memory_order_relaxed); }
  void add(double amount) { value_.fetch_add(amount, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  explicit Histogram(const std::vector<double>& upper_bounds);
  void observe(double value);
  // Cumulative counts per bound (le), the +Inf count, and the sum.
  std::vector<std::uint64_t> cumulative_counts() const;
  std::uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  double sum() const { return sum_.load(std::memory_order_relaxed); }
  const std::vector<double>& upper_bounds() const { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;  // per bound, non-cumulative
  std::atomic<std::uint64_t> count_{0};
  std::atomic<double> sum_{0.0};
};

// A metric name with a fixed list of label names; with({values…}) returns the child for those
// label values, created on first use. References stay valid for the registry's lifetime, so hot
// paths look a child up once and keep the reference.
template <class Metric>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> buckets = {});
  // Throws std::invalid_argument if the number of values differs from the label names.
  Metric& with(const std::vector<std::string>& label_values);
  Metric& unlabelled() { return with({}); }

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  // Calls f(label_values, metric) for every child, in label order. Holds the family's mutex.
  void for_each(const std::function<void(const std::vector<std::string>&, const Metric&)>& f) const;

 private:
  std::string name_;
  std::string help_;
  std::vector<std::string> label_names_;
  std::vector<double> buckets_;
  mutable std::mutex mutex_;
  std::map<std::vector<std::string>, std::unique_ptr<Metric>> children_;
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

class MetricsRegistry {
 public:
  // Registering a name twice with the same type and labels returns the existing family; otherwise
  // (or for an invalid name, label name or bucket list) throws std::invalid_argument.
  CounterFamily& counter(const std::string& name, const std::string& help,
                         std::vector<std::string> label_names = {});
  GaugeFamily& gauge(const std::string& name, const std::string& help,
                     std::vector<std::string> label_names = {});
  HistogramFamily& histogram(const std::string& name, const std::string& help,
                             std::vector<std::string> label_names, std::vector<double> buckets);

  // Runs before every render(), e.g. to set gauges computed from current state (kernels by state).
  void add_collector(std::function<void()> collector);

  // Prometheus text exposition format 0.0.4: HELP and TYPE lines, escaped label values, families
  // in registration order.
  std::string render() const;

 private:
  struct Entry {
    enum class Type { counter, gauge, histogram } type;
    std::unique_ptr<CounterFamily> counter;
    std::unique_ptr<GaugeFamily> gauge;
    std::unique_ptr<HistogramFamily> histogram;
  };
  Entry* find(const std::string& name);

  mutable std::mutex mutex_;
  std::deque<std::pair<std::string, Entry>> entries_;
  std::vector<std::function<void()>> collectors_;
};

// Helpers for the exposition format (exposed for tests).
std::string escape_label_value(std::string_view value);  // \\, \", \n
std::string escape_help(std::string_view help);          // \\, \n
std::string format_metric_value(double value);           // NaN, +Inf, -Inf, shortest round-trip

// The metrics every bridge exposes, registered once at start-up; components keep a reference to
// this and update the family they own. Names follow Prometheus conventions (base units, _total).
struct BridgeMetrics {
  explicit BridgeMetrics(MetricsRegistry& registry);

  MetricsRegistry& registry;
  GaugeFamily& kernels;                    // kb_kernels{state}: set by a collector from the service
  CounterFamily& channel_bytes;            // kb_channel_bytes_total{channel,direction}
                                           //   channel: shell|iopub|stdin|control|hb,
                                           //   direction: to_kernel|from_kernel
  CounterFamily& link_reconnects;          // kb_link_reconnects_total{site}
  HistogramFamily& unicore_latency;        // kb_unicore_request_duration_seconds{site,method}
  CounterFamily& unicore_errors;           // kb_unicore_request_errors_total{site,kind}
  CounterFamily& api_requests;             // kb_api_requests_total{method,route,code}
  CounterFamily& api_connections_refused;  // kb_api_connections_refused_total (limits)
  CounterFamily& api_internal_errors;      // kb_api_internal_errors_total (500s, handler faults)
  GaugeFamily& up_since;                   // kb_start_time_seconds (unix time)
};

}  // namespace kb::bridge
