// Tests bridge/metrics.* (exposition format, escaping, histograms).
#include "bridge/metrics.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "bridge/config.hpp"
#include "tests/common/temp_dir.hpp"

namespace kb::bridge {
namespace {

using ::testing::HasSubstr;

TEST(Metrics, RendersHelpTypeAndSamples) {
  MetricsRegistry registry;
  auto& requests =
      registry.counter("kb_test_requests_total", "Requests.\nSecond line \\ done", {"route"});
  requests.with({"/v1/kernels"}).inc();
  requests.with({"/v1/kernels"}).inc(2);
  requests.with({"/v1/kernels"}).inc(-5);  // counters never go down
  auto& temperature = registry.gauge("kb_test_temperature", "A gauge.");
  temperature.unlabelled().set(-1.5);
  const std::string text = registry.render();
  EXPECT_EQ(text,
            "# HELP kb_test_requests_total Requests.\\nSecond line \\\\ done\n"
            "# TYPE kb_test_requests_total counter\n"
            "kb_test_requests_total{route=\"/v1/kernels\"} 3\n"
            "# HELP kb_test_temperature A gauge.\n"
            "# TYPE kb_test_temperature gauge\n"
            "kb_test_temperature -1.5\n");
}

TEST(Metrics, HistogramBucketsAreCumulativeWithInfSumAndCount) {
  MetricsRegistry registry;
  auto& h = registry.histogram("kb_test_seconds", "Latency.", {"site"}, {0.1, 1});
  auto& demo = h.with({"demo"});
  demo.observe(0.05);
  demo.observe(0.5);
  demo.observe(7);
  const std::string text = registry.render();
  EXPECT_THAT(text, HasSubstr("# TYPE kb_test_seconds histogram\n"));
  EXPECT_THAT(text, HasSubstr("kb_test_seconds_bucket{site=\"demo\",le=\"0.1\"} 1\n"
                              "kb_test_seconds_bucket{site=\"demo\",le=\"1\"} 2\n"
                              "kb_test_seconds_bucket{site=\"demo\",le=\"+Inf\"} 3\n"
                              "kb_test_seconds_sum{site=\"demo\"} 7.55\n"
                              "kb_test_seconds_count{site=\"demo\"} 3\n"));
}

TEST(Metrics, EscapingAndValues) {
  EXPECT_EQ(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  EXPECT_EQ(format_metric_value(NAN), "NaN");
  EXPECT_EQ(format_metric_value(INFINITY), "+Inf");
  EXPECT_EQ(format_metric_value(-INFINITY), "-Inf");
  EXPECT_EQ(format_metric_value(0.1), "0.1");
  EXPECT_EQ(format_metric_value(1e21), "1e+21");
}

TEST(Metrics, RegistrationRules) {
  MetricsRegistry registry;
  auto& a = registry.counter("kb_x_total", "x", {"a"});
  EXPECT_EQ(&registry.counter("kb_x_total", "x", {"a"}), &a);  // same family again
  EXPECT_THROW(registry.gauge("kb_x_total", "x", {"a"}), std::invalid_argument);
  EXPECT_THROW(registry.counter("kb_x_total", "x", {"b"}), std::invalid_argument);
  EXPECT_THROW(registry.counter("9bad", "x"), std::invalid_argument);
  EXPECT_THROW(registry.counter("kb_y_total", "x", {"__reserved"}), std::invalid_argument);
  EXPECT_THROW(registry.histogram("kb_h", "x", {"le"}, {1}), std::invalid_argument);
  EXPECT_THROW(registry.histogram("kb_h", "x", {}, {2, 1}), std::invalid_argument);
  EXPECT_THROW(a.with({"1", "2"}), std::invalid_argument);
}

TEST(Metrics, CollectorsRunBeforeRendering) {
  MetricsRegistry registry;
  auto& g = registry.gauge("kb_kernels", "Kernels.", {"state"});
  int calls = 0;
  registry.add_collector([&] { g.with({"ready"}).set(++calls); });
  EXPECT_THAT(registry.render(), HasSubstr("kb_kernels{state=\"ready\"} 1\n"));
  EXPECT_THAT(registry.render(), HasSubstr("kb_kernels{state=\"ready\"} 2\n"));
}

TEST(Metrics, ConcurrentUpdatesAreNotLost) {
  MetricsRegistry registry;
  auto& c = registry.counter("kb_c_total", "c").unlabelled();
  auto& h = registry.histogram("kb_h_seconds", "h", {}, {1}).unlabelled();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        c.inc();
        h.observe(0.5);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c.value(), 40000);
  EXPECT_EQ(h.count(), 40000u);
  EXPECT_EQ(h.cumulative_counts().at(0), 40000u);
}

}  // namespace
}  // namespace kb::bridge
