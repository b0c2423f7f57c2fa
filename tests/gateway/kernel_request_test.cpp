// Tests gateway/kernel_request.*: POST /api/kernels bodies, the environment whitelist (reference
// H3: the whole jupyter_server environment arrives, hub tokens included), KERNEL_* resource
// overrides, and the kernelspec a GET names (reference 1b).
#include "gateway/kernel_request.hpp"

#include <gtest/gtest.h>

namespace kb::gateway {
namespace {

using namespace std::chrono_literals;

StartRequest start(std::string_view body) {
  auto r = parse_start_request(body);
  if (auto* e = std::get_if<HttpError>(&r)) ADD_FAILURE() << e->message;
  return std::holds_alternative<StartRequest>(r) ? std::get<StartRequest>(r) : StartRequest{};
}

HttpError start_refused(std::string_view body, const StartRequestLimits& limits = {}) {
  auto r = parse_start_request(body, limits);
  if (!std::holds_alternative<HttpError>(r)) {
    ADD_FAILURE() << "accepted: " << body;
    return {};
  }
  return std::get<HttpError>(r);
}

TEST(GatewayStartRequest, BodyAsJupyterServerSendsIt) {
  const auto r = start(R"({"name":"juwels-gpu","env":{"KERNEL_USERNAME":"alice",)"
                       R"("KERNEL_LAUNCH_TIMEOUT":"40","JUPYTERHUB_API_TOKEN":"s3cr3t"}})");
  EXPECT_EQ(r.name, "juwels-gpu");
  EXPECT_EQ(r.env.size(), 3u);
  EXPECT_EQ(r.env.at("KERNEL_LAUNCH_TIMEOUT"), "40");
}

TEST(GatewayStartRequest, NullNameEmptyBodyAndNoEnv) {
  EXPECT_EQ(start(R"({"name":null,"env":{}})").name, std::nullopt);
  EXPECT_EQ(start("").name, std::nullopt);
  EXPECT_EQ(start(" \n").env.size(), 0u);
  EXPECT_EQ(start(R"({"name":"a","env":null,"path":"ignored"})").name, "a");
}

TEST(GatewayStartRequest, Refusals) {
  struct Case {
    const char* body;
    const char* names;  // what the message must mention
  } cases[] = {
      {"{", "not JSON"},
      {"[]", "object"},
      {R"({"name":3})", "name"},
      {R"({"name":"../etc"})", "../etc"},
      {R"({"env":["A=1"]})", "env"},
      {R"({"env":{"KERNEL_NODES":2}})", "KERNEL_NODES"},
      {"{\"env\":{\"A\":\"\xff\"}}", "not JSON"},
  };
  for (const auto& c : cases) {
    const auto e = start_refused(c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_NE(e.message.find(c.names), std::string::npos) << e.message;
  }
  // nlohmann's parser would stop at a NUL byte and take "{}" for the whole body.
  EXPECT_EQ(start_refused(std::string("{}\0[", 4)).status, 400);
  StartRequestLimits limits;
  limits.max_body = 10;
  EXPECT_EQ(start_refused(R"({"name":"python3"})", limits).status, 413);
  limits = {};
  limits.max_variables = 1;
  EXPECT_EQ(start_refused(R"({"env":{"A":"1","B":"2"}})", limits).status, 413);
  limits = {};
  limits.max_value = 3;
  const auto e = start_refused(R"({"env":{"KERNEL_X":"1234"}})", limits);
  EXPECT_EQ(e.status, 413);
  EXPECT_NE(e.message.find("KERNEL_X"), std::string::npos);
  EXPECT_EQ(e.message.find("1234"), std::string::npos) << "a value is quoted";
}

TEST(GatewayEnvWhitelist, OnlyKernelVariablesAndConfiguredNamesPass) {
  const std::map<std::string, std::string> environ = {
      {"KERNEL_USERNAME", "alice"},
      {"KERNEL_WORKING_DIR", "/home/alice/nb"},
      {"KERNEL_LAUNCH_TIMEOUT", "40"},
      {"PATH", "/usr/bin"},
      {"LANG", "C.UTF-8"},
      {"HOME", "/home/alice"},
      {"JUPYTERHUB_API_TOKEN", "hub-secret"},
      {"JUPYTER_GATEWAY_AUTH_TOKEN", "gw-secret"},
      {"JPY_SESSION_NAME", "nb.ipynb"},
  };
  const auto out = filter_env(environ, EnvPolicy{{"LANG"}});
  const std::map<std::string, std::string> expected = {{"KERNEL_LAUNCH_TIMEOUT", "40"},
                                                       {"KERNEL_USERNAME", "alice"},
                                                       {"KERNEL_WORKING_DIR", "/home/alice/nb"},
                                                       {"LANG", "C.UTF-8"}};
  EXPECT_EQ(out.passed, expected);
  EXPECT_EQ(out.dropped, 5u);
  EXPECT_TRUE(out.refused.empty());
}

TEST(GatewayEnvWhitelist, TokensNeverPassEvenIfConfigured) {
  const std::map<std::string, std::string> environ = {
      {"JUPYTERHUB_API_TOKEN", "value-1"}, {"JUPYTER_GATEWAY_AUTH_TOKEN", "value-2"},
      {"KERNEL_AUTH_TOKEN", "value-3"},    {"KERNEL_Db_Password", "value-4"},
      {"MY_SECRET_KEY", "value-5"},        {"kernel_github_token", "value-6"},
  };
  EnvPolicy policy{{"JUPYTERHUB_API_TOKEN", "JUPYTER_GATEWAY_AUTH_TOKEN", "MY_SECRET_KEY",
                    "kernel_github_token"}};
  const auto out = filter_env(environ, policy);
  EXPECT_TRUE(out.passed.empty());
  ASSERT_EQ(out.refused.size(), 6u);
  for (const auto& [name, why] : out.refused) {
    EXPECT_NE(why.find("credential"), std::string::npos) << name;
    for (const auto& [n, value] : environ) {
      EXPECT_EQ(why.find(value), std::string::npos);
      EXPECT_EQ(name.find(value), std::string::npos);
    }
  }
  for (const char* n : {"JUPYTERHUB_API_TOKEN", "x_Token", "SECRET", "A_PASSWORD_B"})
    EXPECT_TRUE(looks_secret(n)) << n;
  for (const char* n : {"KERNEL_USERNAME", "PATH", "KERNEL_TOKE_N"}) EXPECT_FALSE(looks_secret(n));
}

TEST(GatewayEnvWhitelist, NamesAndValuesAJobCanCarry) {
  const std::map<std::string, std::string> environ = {
      {"KERNEL_A-B", "1"}, {"KERNEL_NL", "a\nb"}, {"KERNEL_DEL", "a\x7f"}, {"KERNEL_OK", "a b=c"}};
  const auto out = filter_env(environ, {});
  EXPECT_EQ(out.passed, (std::map<std::string, std::string>{{"KERNEL_OK", "a b=c"}}));
  ASSERT_EQ(out.refused.size(), 3u);
}

ResourceOverrides overrides(const std::map<std::string, std::string>& env) {
  auto r = resource_overrides(env);
  if (auto* e = std::get_if<HttpError>(&r)) ADD_FAILURE() << e->message;
  return std::holds_alternative<ResourceOverrides>(r) ? std::get<ResourceOverrides>(r)
                                                      : ResourceOverrides{};
}

TEST(GatewayResourceOverrides, AllSix) {
  const auto r = overrides({{"KERNEL_PROJECT", "hpc-ai"},
                            {"KERNEL_PARTITION", "booster"},
                            {"KERNEL_NODES", "2"},
                            {"KERNEL_GPUS", "4"},
                            {"KERNEL_RUNTIME", "2h30m"},
                            {"KERNEL_RESERVATION", "maint.2024"},
                            {"KERNEL_USERNAME", "alice"}});
  EXPECT_EQ(r.project, "hpc-ai");
  EXPECT_EQ(r.partition, "booster");
  EXPECT_EQ(r.nodes, 2);
  EXPECT_EQ(r.gpus, 4);
  EXPECT_EQ(r.runtime, 9000s);
  EXPECT_EQ(r.reservation, "maint.2024");
  EXPECT_FALSE(r.empty());
  EXPECT_TRUE(overrides({{"KERNEL_USERNAME", "alice"}, {"KERNEL_GPUS", ""}}).empty());
  EXPECT_EQ(overrides({{"KERNEL_GPUS", "0"}, {"KERNEL_NODES", "1000000"}}).gpus, 0);
}

TEST(GatewayResourceOverrides, ErrorsNameTheVariable) {
  const std::pair<std::string, std::string> bad[] = {
      {"KERNEL_NODES", "0"},          {"KERNEL_NODES", "1000001"},
      {"KERNEL_NODES", "-1"},         {"KERNEL_NODES", "1e3"},
      {"KERNEL_NODES", " 2"},         {"KERNEL_GPUS", "1025"},
      {"KERNEL_GPUS", "four"},        {"KERNEL_RUNTIME", "0"},
      {"KERNEL_RUNTIME", "2x"},       {"KERNEL_RUNTIME", "30m2h"},
      {"KERNEL_RUNTIME", "1h1h"},     {"KERNEL_RUNTIME", "2h30"},
      {"KERNEL_PARTITION", "a b"},    {"KERNEL_PROJECT", "x;rm"},
      {"KERNEL_RESERVATION", "\xff"}, {"KERNEL_PROJECT", std::string(129, 'p')},
  };
  for (const auto& [var, value] : bad) {
    auto r = resource_overrides({{var, value}});
    ASSERT_TRUE(std::holds_alternative<HttpError>(r)) << var << "=" << value;
    const auto& e = std::get<HttpError>(r);
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.message.rfind(var + "=", 0), 0u) << e.message;
  }
}

TEST(GatewayResourceOverrides, RunTimes) {
  EXPECT_EQ(parse_runtime("3600"), 3600s);
  EXPECT_EQ(parse_runtime("90min"), 5400s);
  EXPECT_EQ(parse_runtime("15m"), 900s);
  EXPECT_EQ(parse_runtime("1d12h"), 129600s);
  EXPECT_EQ(parse_runtime("45s"), 45s);
  EXPECT_EQ(parse_runtime("1h30min15s"), 5415s);
  for (const char* t : {"", "h", "1hh", "1h 30m", "99999999999", "40000d", "1.5h", "1H"})
    EXPECT_EQ(parse_runtime(t), std::nullopt) << t;
}

KernelspecTarget target(std::string_view path, std::string_view query) {
  auto r = parse_kernelspec_target(path, query);
  if (auto* e = std::get_if<HttpError>(&r))
    ADD_FAILURE() << path << "?" << query << ": " << e->message;
  return std::holds_alternative<KernelspecTarget>(r) ? std::get<KernelspecTarget>(r)
                                                     : KernelspecTarget{};
}

TEST(GatewayKernelspecTarget, ListOneAndTheUserQuirk) {
  EXPECT_EQ(target("/api/kernelspecs", "").name, std::nullopt);
  EXPECT_EQ(target("/api/kernelspecs/", "").name, std::nullopt);
  EXPECT_EQ(target("/api/kernelspecs/python3", "").name, "python3");
  EXPECT_EQ(target("/api/kernelspecs/python3/", "").name, "python3");
  EXPECT_EQ(target("/api/kernelspecs/a%2Eb", "").name, "a.b");
  const auto quirk = target("/api/kernelspecs", "user=alice/juwels-gpu");
  EXPECT_EQ(quirk.name, "juwels-gpu");
  EXPECT_EQ(quirk.user, "alice");
  const auto filtered = target("/api/kernelspecs", "x=1&user=al%69ce");
  EXPECT_EQ(filtered.name, std::nullopt);
  EXPECT_EQ(filtered.user, "alice");
  EXPECT_EQ(target("/api/kernelspecs/python3", "user=alice").user, "alice");
}

TEST(GatewayKernelspecTarget, Refusals) {
  const std::tuple<const char*, const char*, int> cases[] = {
      {"/api/kernelspecsx", "", 404},           {"/api/kernels", "", 404},
      {"/api/kernelspecs/a/b", "", 404},        {"/api/kernelspecs/a b", "", 404},
      {"/api/kernelspecs/%2F", "", 404},        {"/api/kernelspecs/a%2", "", 400},
      {"/api/kernelspecs", "user=alice/", 404}, {"/api/kernelspecs", "user=a/b c", 404},
      {"/api/kernelspecs", "user=%zz", 400},
  };
  for (const auto& [path, query, status] : cases) {
    auto r = parse_kernelspec_target(path, query);
    ASSERT_TRUE(std::holds_alternative<HttpError>(r)) << path << "?" << query;
    EXPECT_EQ(std::get<HttpError>(r).status, status) << path << "?" << query;
  }
}

TEST(GatewayKernelspecTarget, PercentDecode) {
  EXPECT_EQ(percent_decode("a%20b+c", true), "a b c");
  EXPECT_EQ(percent_decode("a%20b+c", false), "a b+c");
  EXPECT_EQ(percent_decode("%", false), std::nullopt);
  EXPECT_EQ(percent_decode("%4", false), std::nullopt);
  EXPECT_EQ(percent_decode("%G0", false), std::nullopt);
}

}  // namespace
}  // namespace kb::gateway
