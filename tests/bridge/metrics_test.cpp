// Tests bridge/metrics.* (exposition format, escaping, histograms), bridge/credentials_store.* and
// bridge/http_auth.* (tokens file).
#include "bridge/metrics.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "bridge/config.hpp"
#include "bridge/credentials_store.hpp"
#include "bridge/http_auth.hpp"
#include "tests/bridge/temp_dir.hpp"

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

TEST(CredentialsStore, StoresExpiresReplacesAndNotifies) {
  CredentialsStore store;
  const auto now = CredentialsStore::Clock::now();
  std::vector<std::string> notified;
  auto handle = store.subscribe([&](const std::string& user) { notified.push_back(user); });
  EXPECT_EQ(store.info("alice").status, CredentialsStore::Status::missing);
  store.set("alice", "token-1", now + std::chrono::minutes(5), now);
  EXPECT_EQ(store.token("alice", now), "token-1");
  EXPECT_EQ(store.info("alice", now).status, CredentialsStore::Status::valid);
  EXPECT_FALSE(store.token("alice", now + std::chrono::minutes(6)));
  EXPECT_EQ(store.info("alice", now + std::chrono::minutes(6)).status,
            CredentialsStore::Status::expired);
  store.set("alice", "token-2", std::nullopt, now);
  EXPECT_EQ(store.token("alice", now + std::chrono::hours(100)), "token-2");
  EXPECT_FALSE(store.token("bob"));
  store.unsubscribe(handle);
  store.set("bob", "token-3", std::nullopt);
  EXPECT_EQ(notified, (std::vector<std::string>{"alice", "alice"}));
  store.erase("alice");
  EXPECT_FALSE(store.token("alice"));
  EXPECT_EQ(store.size(), 1u);
}

const std::string kToken = "0123456789abcdef0123456789abcdef";

TEST(ApiTokens, ParsesUsersAndAdminFlag) {
  ApiTokens tokens = ApiTokens::parse(
      "# comment\n\n" + kToken + " alice\n" + kToken + "X hub admin\r\n", "tokens");
  EXPECT_EQ(tokens.size(), 2u);
  auto alice = tokens.lookup(kToken);
  ASSERT_TRUE(alice);
  EXPECT_EQ(alice->user, "alice");
  EXPECT_FALSE(alice->admin);
  auto hub = tokens.lookup(kToken + "X");
  ASSERT_TRUE(hub);
  EXPECT_TRUE(hub->admin);
  EXPECT_FALSE(tokens.lookup(kToken.substr(1)));
  EXPECT_FALSE(tokens.lookup(""));
}

std::string tokens_error(const std::string& text) {
  try {
    ApiTokens::parse(text, "/etc/kb/api-tokens");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ApiTokens, ErrorsNameFileAndLineButNeverTheToken) {
  EXPECT_EQ(tokens_error("short alice\n"),
            "/etc/kb/api-tokens:1: token is shorter than 32 characters; generate one with: openssl "
            "rand -hex 32");
  EXPECT_EQ(tokens_error("\n" + kToken + "\n"),
            "/etc/kb/api-tokens:2: expected \"<token> <user>\" or \"<token> <user> admin\"");
  EXPECT_EQ(tokens_error(kToken + " a root\n"),
            "/etc/kb/api-tokens:1: unknown flag 'root' (the only flag is 'admin')");
  const std::string dup = tokens_error(kToken + " a\n" + kToken + " b\n");
  EXPECT_EQ(dup, "/etc/kb/api-tokens:2: this token is listed twice; each token must name one user");
  EXPECT_THAT(dup, ::testing::Not(HasSubstr(kToken)));
}

TEST(ApiTokens, FileMustBePrivate) {
  test::TempDir dir;
  const std::string path = dir.write("api-tokens", kToken + " alice\n", 0640);
  try {
    ApiTokens::load(path);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(
        std::string(e.what()),
        path +
            ": the API tokens file is accessible by group or others (mode 0640); run: chmod 600 " +
            path);
  }
  ::chmod(path.c_str(), 0600);
  EXPECT_EQ(ApiTokens::load(path).size(), 1u);
}

}  // namespace
}  // namespace kb::bridge
