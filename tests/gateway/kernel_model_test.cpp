// Tests gateway/kernel_model.*: the REST replies' exact forms (reference H4: ids, last_activity,
// connections, execution_state), kernelspecs, GET /api, error bodies.
#include "gateway/kernel_model.hpp"

#include <gtest/gtest.h>

#include <regex>

namespace kb::gateway {
namespace {

using namespace std::chrono;
using json = nlohmann::json;

// 2024-01-02T03:04:05Z
const system_clock::time_point kAt = system_clock::from_time_t(1704164645);

KernelSpec spec(const std::string& name) {
  KernelSpec s;
  s.name = name;
  s.argv = {"kernel-bridge", "kernel", "{connection_file}"};
  s.display_name = "JUWELS: Python, 4 GPUs, 1 h";
  s.language = "python";
  return s;
}

TEST(GatewayKernelModel, LastActivityAlwaysHasMicrosecondsAndZ) {
  EXPECT_EQ(format_last_activity(kAt + microseconds(123456)), "2024-01-02T03:04:05.123456Z");
  EXPECT_EQ(format_last_activity(kAt), "2024-01-02T03:04:05.000000Z");
  EXPECT_EQ(format_last_activity(kAt + nanoseconds(999)), "2024-01-02T03:04:05.000000Z");
  EXPECT_EQ(format_last_activity(kAt + microseconds(999999)), "2024-01-02T03:04:05.999999Z");
  // The gateway client's strptime "%Y-%m-%dT%H:%M:%S.%fZ" for any time now.
  const std::regex form(R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z)");
  EXPECT_TRUE(std::regex_match(format_last_activity(system_clock::now()), form));
}

TEST(GatewayKernelModel, KernelJsonExactly) {
  KernelModel k;
  k.id = "0f4b3d2c-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
  k.name = "juwels-gpu";
  k.last_activity = kAt + microseconds(5);
  k.execution_state = ExecutionState::idle;
  k.connections = 2;
  EXPECT_EQ(
      kernel_json(k).dump(),
      R"({"connections":2,"execution_state":"idle","id":"0f4b3d2c-1a2b-4c3d-8e9f-0a1b2c3d4e5f",)"
      R"("last_activity":"2024-01-02T03:04:05.000005Z","name":"juwels-gpu"})");
  k.execution_state = ExecutionState::starting;
  k.reason = "job 4711 is queued";
  const auto j = kernel_json(k);
  EXPECT_EQ(j["reason"], "job 4711 is queued");
  EXPECT_EQ(j["execution_state"], "starting");
  EXPECT_TRUE(j["connections"].is_number_integer());
  EXPECT_EQ(kernels_json({}).dump(), "[]");
  const KernelModel two[] = {k, k};
  EXPECT_EQ(kernels_json(two).size(), 2u);
}

TEST(GatewayKernelModel, ExecutionStatesAsJupyterLabNamesThem) {
  EXPECT_STREQ(to_string(ExecutionState::autorestarting), "autorestarting");
  EXPECT_STREQ(to_string(ExecutionState::dead), "dead");
  EXPECT_STREQ(to_string(ExecutionState::busy), "busy");
}

TEST(GatewayKernelModel, KernelIdsMatchJupyterServersRoute) {
  for (const char* id : {"0f4b3d2c-1a2b-4c3d-8e9f-0a1b2c3d4e5f", "a-b-c-d-e", "A_1-b-c-d-e_"})
    EXPECT_TRUE(valid_kernel_id(id)) << id;
  for (const char* id :
       {"", "a-b-c-d", "a-b-c-d-e-f", "a--b-c-d-e", "-a-b-c-d", "a-b-c-d-e-", "a-b-c-d-e/x",
        "a-b-c-d-\xc3\xa9", "a b-c-d-e-f", "../../etc-a-b-c-d", "a.b-c-d-e-f"})
    EXPECT_FALSE(valid_kernel_id(id)) << id;
}

TEST(GatewayKernelModel, KernelspecNamesMatchJupyterServersRoute) {
  for (const char* n : {"python3", "juwels.gpu-4", "a%20b", "_"})
    EXPECT_TRUE(valid_kernelspec_name(n));
  for (const char* n : {"", "a/b", "a b", "a?b", "\xc3\xa9"})
    EXPECT_FALSE(valid_kernelspec_name(n));
}

TEST(GatewayKernelModel, KernelspecJsonExactly) {
  auto s = spec("juwels-gpu");
  s.resources["logo-64x64"] = "/user/alice/kernelspecs/juwels-gpu/logo-64x64.png";
  s.metadata = {{"kernel_bridge", {{"site", "juwels"}}}};
  EXPECT_EQ(kernelspec_json(s).dump(),
            R"({"name":"juwels-gpu","resources":{"logo-64x64":"/user/alice/kernelspecs/)"
            R"(juwels-gpu/logo-64x64.png"},"spec":{"argv":["kernel-bridge","kernel",)"
            R"("{connection_file}"],"display_name":"JUWELS: Python, 4 GPUs, 1 h","env":{},)"
            R"("interrupt_mode":"signal","language":"python","metadata":{"kernel_bridge":)"
            R"({"site":"juwels"}}}})");
}

TEST(GatewayKernelModel, KernelspecsListAsTheClientReadsIt) {
  const KernelSpec specs[] = {spec("a"), spec("b")};
  const auto j = kernelspecs_json("b", specs);
  EXPECT_EQ(j["default"], "b");
  ASSERT_TRUE(j["kernelspecs"].is_object());
  EXPECT_EQ(j["kernelspecs"].size(), 2u);
  // Each entry has name, spec and resources, so jupyter_server passes it on verbatim.
  for (const auto& [name, entry] : j["kernelspecs"].items()) {
    EXPECT_EQ(entry["name"], name);
    EXPECT_TRUE(entry["spec"]["argv"].is_array());
    EXPECT_TRUE(entry["spec"]["display_name"].is_string());
    EXPECT_TRUE(entry["spec"]["language"].is_string());
    EXPECT_TRUE(entry["resources"].is_object());
  }
  EXPECT_EQ(kernelspecs_json("", {}).dump(), R"({"default":"","kernelspecs":{}})");
}

TEST(GatewayKernelModel, ValidateKernelspecs) {
  std::vector<KernelSpec> specs = {spec("a"), spec("b")};
  EXPECT_EQ(validate_kernelspecs("a", specs), std::nullopt);
  EXPECT_EQ(validate_kernelspecs("x", {}), std::nullopt);
  auto problem = [&](std::string_view def, const std::vector<KernelSpec>& list) {
    const auto e = validate_kernelspecs(def, list);
    EXPECT_TRUE(e.has_value());
    return e.value_or("");
  };
  EXPECT_NE(problem("c", specs).find("default"), std::string::npos);
  EXPECT_NE(problem("a", {spec("a"), spec("a")}).find("twice"), std::string::npos);
  EXPECT_NE(problem("a/b", {spec("a/b")}).find("name"), std::string::npos);
  auto broken = spec("a");
  broken.argv.clear();
  EXPECT_NE(problem("a", {broken}).find("argv"), std::string::npos);
  broken = spec("a");
  broken.language = "";
  EXPECT_NE(problem("a", {broken}).find("language"), std::string::npos);
  broken = spec("a");
  broken.interrupt_mode = "kill";
  EXPECT_NE(problem("a", {broken}).find("interrupt_mode"), std::string::npos);
  broken = spec("a");
  broken.metadata = json::array();
  EXPECT_NE(problem("a", {broken}).find("metadata"), std::string::npos);
  broken = spec("a");
  broken.display_name = "\xff";
  EXPECT_NE(problem("a", {broken}).find("UTF-8"), std::string::npos);
}

TEST(GatewayKernelModel, ErrorBodyHasMessageAndReason) {
  EXPECT_EQ(error_json({404, "no kernel abc"}).dump(),
            R"({"message":"no kernel abc","reason":"Not Found"})");
  EXPECT_EQ(error_json({403, "x"})["reason"], "Forbidden");
  EXPECT_EQ(error_json({599, "x"})["reason"], "Error");
  // Outside text is made printable: the body always serializes.
  const auto j = error_json({400, "bad \xff\nline"});
  EXPECT_EQ(j["message"].get<std::string>().find('\n'), std::string::npos);
  EXPECT_NO_THROW(j.dump());
}

TEST(GatewayKernelModel, ApiInfo) {
  EXPECT_EQ(api_info_json("0.1.0").dump(), R"({"kernel_bridge":"0.1.0","version":"1.23.3"})");
}

}  // namespace
}  // namespace kb::gateway
