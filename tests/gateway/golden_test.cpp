// Checks gateway/ against the real implementations: tests/gateway/golden.json holds bytes made by
// Debian's jupyter_server 1.23 and jupyter_client 7.4 (tests/gateway/make_golden.py; the ctest
// gateway_golden_vectors regenerates them and fails if they differ from the committed file).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "gateway/jupyter_message.hpp"
#include "gateway/kernel_request.hpp"
#include "gateway/ws_codec.hpp"

namespace kb::gateway {
namespace {

using json = nlohmann::json;

const json& golden() {
  static const json j = [] {
    const char* dir = std::getenv("KB_SOURCE_DIR");
    std::ifstream in(std::string(dir ? dir : ".") + "/tests/gateway/golden.json");
    std::stringstream text;
    text << in.rdbuf();
    return json::parse(text.str(), nullptr, false);
  }();
  return j;
}

std::string unhex(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::vector<std::string> unhex_all(const json& list) {
  std::vector<std::string> out;
  for (const auto& h : list) out.push_back(unhex(h.get<std::string>()));
  return out;
}

MessageSigner golden_signer() {
  return std::get<MessageSigner>(MessageSigner::create(golden()["key"].get<std::string>()));
}

JupyterMessage golden_parse(const char* field) {
  auto r = parse(unhex_all(golden()[field]), golden_signer());
  if (auto* e = std::get_if<GatewayError>(&r)) ADD_FAILURE() << e->message;
  return std::holds_alternative<JupyterMessage>(r) ? std::get<JupyterMessage>(r) : JupyterMessage{};
}

// The legacy binary layout split into its parts (independently of the code under test).
std::vector<std::string> split_legacy(const std::string& s) {
  auto u32 = [&s](std::size_t at) {
    return std::uint32_t(std::uint8_t(s[at])) << 24 | std::uint32_t(std::uint8_t(s[at + 1])) << 16 |
           std::uint32_t(std::uint8_t(s[at + 2])) << 8 | std::uint32_t(std::uint8_t(s[at + 3]));
  };
  std::vector<std::string> parts;
  const std::uint32_t n = u32(0);
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::size_t start = u32(4 * (i + 1));
    const std::size_t end = i + 1 < n ? u32(4 * (i + 2)) : s.size();
    parts.push_back(s.substr(start, end - start));
  }
  return parts;
}

TEST(GatewayGolden, VectorsAreThere) {
  ASSERT_TRUE(golden().is_object()) << "tests/gateway/golden.json is missing or not JSON";
  EXPECT_GE(golden().size(), 15u);
}

TEST(GatewayGolden, JupyterClientsSignatureVerifiesAndOursIsTheSame) {
  const auto parts = unhex_all(golden()["signed_parts"]);
  const auto m = golden_parse("signed_parts");
  EXPECT_EQ(m.identities, std::vector<std::string>{"routing-id"});
  ASSERT_EQ(m.buffers.size(), 3u);
  EXPECT_EQ(m.buffers[1], "");
  const auto again = serialize(m, golden_signer());
  ASSERT_TRUE(std::holds_alternative<std::vector<std::string>>(again));
  EXPECT_EQ(std::get<std::vector<std::string>>(again), parts);  // byte for byte, signature too
  auto wrong = std::get<MessageSigner>(MessageSigner::create("not-the-key"));
  auto r = parse(parts, wrong);
  ASSERT_TRUE(std::holds_alternative<GatewayError>(r));
  EXPECT_EQ(std::get<GatewayError>(r).fault, Fault::bad_signature);
}

TEST(GatewayGolden, LegacyOutboundBinaryMatchesJupyterServer) {
  const auto m = golden_parse("signed_parts");
  auto r = encode_kernel_message(WsProtocol::legacy, Channel::iopub, m);
  ASSERT_TRUE(std::holds_alternative<WsFrame>(r));
  const auto& frame = std::get<WsFrame>(r);
  EXPECT_EQ(frame.kind, FrameKind::binary);
  const auto ours = split_legacy(frame.payload);
  const auto theirs = split_legacy(unhex(golden()["legacy_out_binary"]));
  ASSERT_EQ(ours.size(), theirs.size());
  // jupyter_server prints JSON with ", " and ": "; the same JSON value is what counts.
  EXPECT_EQ(json::parse(ours[0]), json::parse(theirs[0]));
  for (std::size_t i = 1; i < ours.size(); ++i) EXPECT_EQ(ours[i], theirs[i]) << "buffer " << i;
}

TEST(GatewayGolden, LegacyOutboundTextMatchesJupyterServer) {
  const auto m = golden_parse("signed_parts_no_buffers");
  auto r = encode_kernel_message(WsProtocol::legacy, Channel::shell, m);
  ASSERT_TRUE(std::holds_alternative<WsFrame>(r));
  EXPECT_EQ(std::get<WsFrame>(r).kind, FrameKind::text);
  EXPECT_EQ(json::parse(std::get<WsFrame>(r).payload),
            json::parse(golden()["legacy_out_text"].get<std::string>()));
}

TEST(GatewayGolden, V1OutboundIsByteIdenticalToJupyterServer) {
  const auto m = golden_parse("signed_parts");
  auto r = encode_kernel_message(WsProtocol::v1, Channel::iopub, m);
  ASSERT_TRUE(std::holds_alternative<WsFrame>(r));
  EXPECT_EQ(std::get<WsFrame>(r).payload, unhex(golden()["v1_out"]));
}

TEST(GatewayGolden, LegacyInboundBinaryFromJupyterServersSerializer) {
  auto r = decode_client_frame(WsProtocol::legacy, FrameKind::binary,
                               unhex(golden()["legacy_in_binary"]));
  ASSERT_TRUE(std::holds_alternative<ClientMessage>(r)) << std::get<GatewayError>(r).message;
  const auto& m = std::get<ClientMessage>(r);
  const auto& expected = golden()["legacy_in_json"];
  EXPECT_EQ(m.channel, Channel::shell);
  EXPECT_EQ(json::parse(m.message.header), expected["header"]);
  EXPECT_EQ(json::parse(m.message.content), expected["content"]);
  EXPECT_EQ(m.message.buffers, unhex_all(golden()["legacy_in_binary_buffers"]));
}

TEST(GatewayGolden, TextFrameJupyterServer123ReallySendsIsAccepted) {
  // Captured off the socket: GatewayWebSocketClient.on_message with a browser's binary message.
  ASSERT_EQ(golden()["h2_frame_opcode"], 1) << "jupyter_server no longer relays as text";
  const std::string payload = unhex(golden()["h2_frame_payload"]);
  auto r = decode_client_frame(WsProtocol::legacy, FrameKind::text, payload);
  ASSERT_TRUE(std::holds_alternative<ClientMessage>(r)) << std::get<GatewayError>(r).message;
  const auto& m = std::get<ClientMessage>(r);
  EXPECT_EQ(m.header.msg_type, "comm_msg");
  EXPECT_EQ(m.message.buffers, unhex_all(golden()["legacy_in_binary_buffers"]));
  EXPECT_EQ(json::parse(m.message.content), golden()["legacy_in_json"]["content"]);
}

TEST(GatewayGolden, V1InboundFromJupyterServersSerializer) {
  auto r = decode_client_frame(WsProtocol::v1, FrameKind::binary, unhex(golden()["v1_in"]));
  ASSERT_TRUE(std::holds_alternative<ClientMessage>(r)) << std::get<GatewayError>(r).message;
  const auto& m = std::get<ClientMessage>(r);
  const auto parts = unhex_all(golden()["v1_in_parts"]);
  ASSERT_EQ(parts.size(), 6u);
  EXPECT_EQ(m.channel, Channel::shell);
  EXPECT_EQ(m.message.header, parts[0]);
  EXPECT_EQ(m.message.parent_header, parts[1]);
  EXPECT_EQ(m.message.metadata, parts[2]);
  EXPECT_EQ(m.message.content, parts[3]);
  EXPECT_EQ(m.message.buffers, (std::vector<std::string>{parts[4], parts[5]}));
}

TEST(GatewayGolden, KernelspecUrlsJupyterServerAsksFor) {
  // The URL is http://host/api/kernelspecs?user=alice[/name]: split it as a server would.
  auto target = [](const std::string& url) {
    const std::string path_and_query = url.substr(url.find('/', url.find("//") + 2));
    const auto q = path_and_query.find('?');
    return parse_kernelspec_target(path_and_query.substr(0, q),
                                   q == std::string::npos ? "" : path_and_query.substr(q + 1));
  };
  auto one = target(golden()["kernelspec_url_one"]);
  ASSERT_TRUE(std::holds_alternative<KernelspecTarget>(one));
  EXPECT_EQ(std::get<KernelspecTarget>(one).name, "my.spec-1");
  EXPECT_EQ(std::get<KernelspecTarget>(one).user, "alice");
  auto list = target(golden()["kernelspec_url_list"]);
  ASSERT_TRUE(std::holds_alternative<KernelspecTarget>(list));
  EXPECT_EQ(std::get<KernelspecTarget>(list).name, std::nullopt);
  EXPECT_EQ(std::get<KernelspecTarget>(list).user, "alice");
}

}  // namespace
}  // namespace kb::gateway
