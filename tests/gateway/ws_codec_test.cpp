// Tests gateway/ws_codec.*: WebSocket frames of both protocols to and from Jupyter messages,
// every class of malformed frame, the size limit. Byte-for-byte agreement with jupyter_server's
// own serializers is golden_test.cpp's.
#include "gateway/ws_codec.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdint>

namespace kb::gateway {
namespace {

using json = nlohmann::json;

const char* kHeader = R"({"msg_id":"m-1","msg_type":"comm_msg","session":"s","username":"u",)"
                      R"("date":"2024-01-02T03:04:05.123456Z","version":"5.3"})";

std::string be32(std::uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
          static_cast<char>(v)};
}
std::string le64(std::uint64_t v) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
  return s;
}

// The legacy binary layout as JupyterLab's serializeBinary writes it.
std::string legacy_layout(const std::string& json_part, const std::vector<std::string>& buffers) {
  const std::uint32_t nbufs = 1 + static_cast<std::uint32_t>(buffers.size());
  std::string out = be32(nbufs);
  std::uint32_t offset = 4 * (nbufs + 1);
  out += be32(offset);
  offset += static_cast<std::uint32_t>(json_part.size());
  for (const auto& b : buffers) {
    out += be32(offset);
    offset += static_cast<std::uint32_t>(b.size());
  }
  out += json_part;
  for (const auto& b : buffers) out += b;
  return out;
}

// The v1 layout as JupyterLab's serializeV1KernelWebsocketJupyterOrg writes it.
std::string v1_layout(const std::string& channel, const std::vector<std::string>& parts) {
  const std::uint64_t n = parts.size() + 2;
  std::string out = le64(n);
  std::uint64_t offset = 8 * (n + 1);
  out += le64(offset);
  out += le64(offset += channel.size());
  for (const auto& p : parts) out += le64(offset += p.size());
  out += channel;
  for (const auto& p : parts) out += p;
  return out;
}

ClientMessage accepted(WsProtocol p, FrameKind k, const std::string& payload,
                       const WsLimits& limits = {}) {
  auto r = decode_client_frame(p, k, payload, limits);
  if (auto* e = std::get_if<GatewayError>(&r)) {
    ADD_FAILURE() << "refused: " << e->message;
    return {};
  }
  return std::get<ClientMessage>(r);
}

GatewayError refused(WsProtocol p, FrameKind k, const std::string& payload,
                     const WsLimits& limits = {}) {
  auto r = decode_client_frame(p, k, payload, limits);
  if (!std::holds_alternative<GatewayError>(r)) {
    ADD_FAILURE() << "accepted: " << payload.substr(0, 80);
    return {Fault::crypto, ""};
  }
  const auto e = std::get<GatewayError>(r);
  EXPECT_FALSE(e.message.empty());
  return e;
}

JupyterMessage kernel_message(std::vector<std::string> buffers = {}) {
  JupyterMessage m;
  m.identities = {"not-for-the-client"};
  m.header = kHeader;
  m.parent_header = R"({"msg_id":"p-1"})";
  m.metadata = "{}";
  m.content = R"({"data":{"x":"\u00e9"}})";
  m.buffers = std::move(buffers);
  return m;
}

TEST(GatewayWsCodec, ChooseProtocol) {
  EXPECT_EQ(choose_protocol(""), WsProtocol::legacy);
  EXPECT_EQ(choose_protocol("v1.kernel.websocket.jupyter.org"), WsProtocol::v1);
  EXPECT_EQ(choose_protocol("chat, \tv1.kernel.websocket.jupyter.org "), WsProtocol::v1);
  EXPECT_EQ(choose_protocol("V1.KERNEL.WEBSOCKET.JUPYTER.ORG"), WsProtocol::legacy);
  EXPECT_EQ(choose_protocol("v1.kernel.websocket.jupyter.org.x,v2"), WsProtocol::legacy);
}

TEST(GatewayWsCodec, LegacyTextFrameAsJupyterLabSendsIt) {
  const std::string frame = std::string(R"({"header":)") + kHeader +
                            R"(,"parent_header":{},"metadata":{},"content":{"code":"1+1"},)"
                            R"("buffers":[],"channel":"control"})";
  const auto m = accepted(WsProtocol::legacy, FrameKind::text, frame);
  EXPECT_EQ(m.channel, Channel::control);
  EXPECT_EQ(m.header.msg_id, "m-1");
  EXPECT_EQ(m.header.msg_type, "comm_msg");
  EXPECT_EQ(json::parse(m.message.header), json::parse(kHeader));
  EXPECT_EQ(json::parse(m.message.content), json::parse(R"({"code":"1+1"})"));
  EXPECT_TRUE(m.message.identities.empty());
  EXPECT_TRUE(m.message.buffers.empty());
}

TEST(GatewayWsCodec, LegacyDefaults) {
  // No channel is shell; absent or null parent_header, metadata and content are {}.
  const auto m = accepted(WsProtocol::legacy, FrameKind::text,
                          std::string(R"({"header":)") + kHeader + R"(,"parent_header":null})");
  EXPECT_EQ(m.channel, Channel::shell);
  EXPECT_EQ(m.message.parent_header, "{}");
  EXPECT_EQ(m.message.metadata, "{}");
  EXPECT_EQ(m.message.content, "{}");
  EXPECT_EQ(accepted(WsProtocol::legacy, FrameKind::text,
                     std::string(R"({"channel":"stdin","header":)") + kHeader + "}")
                .channel,
            Channel::stdin_channel);
}

TEST(GatewayWsCodec, LegacyTextFrameErrors) {
  const std::string h = std::string(R"("header":)") + kHeader;
  struct Case {
    std::string frame;
    Fault fault;
  } cases[] = {
      {"not json", Fault::bad_json},
      {"[1,2]", Fault::bad_json},
      {"{\"header\":{\"msg_id\":\"\xc3\x28\"}}", Fault::bad_json},  // invalid UTF-8
      {"{" + h + ",\"channel\":\"iopub\"}", Fault::bad_channel},
      {"{" + h + ",\"channel\":\"hb\"}", Fault::bad_channel},
      {"{" + h + ",\"channel\":3}", Fault::bad_channel},
      {R"({"content":{}})", Fault::bad_message},
      {R"({"header":"x"})", Fault::bad_message},
      {R"({"header":{"msg_id":"m"}})", Fault::bad_message},
      {"{" + h + ",\"content\":\"text\"}", Fault::bad_message},
      {"{" + h + ",\"metadata\":[]}", Fault::bad_message},
      {"{" + h + ",\"buffers\":[\"AAEC\"]}", Fault::bad_message},
      {"{" + h + ",\"buffers\":{}}", Fault::bad_message},
      {"", Fault::bad_json},
      {"{" + h + "}" + std::string("\0{", 2), Fault::bad_json},
      {"{" + h + ",\"content\":{\"a\":" + std::string(300, '[') + std::string(300, ']') + "}}",
       Fault::bad_json},
  };
  for (const auto& c : cases)
    EXPECT_EQ(refused(WsProtocol::legacy, FrameKind::text, c.frame).fault, c.fault) << c.frame;
}

TEST(GatewayWsCodec, LegacyBinaryFrameWithBuffers) {
  const std::string js = std::string(R"({"header":)") + kHeader +
                         R"(,"parent_header":{},"metadata":{},"content":{"comm_id":"w"},)"
                         R"("channel":"shell"})";
  const std::vector<std::string> buffers = {std::string("\x00\xff\x10", 3), "", "tail"};
  const auto m = accepted(WsProtocol::legacy, FrameKind::binary, legacy_layout(js, buffers));
  EXPECT_EQ(m.channel, Channel::shell);
  EXPECT_EQ(m.message.buffers, buffers);
  EXPECT_EQ(json::parse(m.message.content)["comm_id"], "w");
  // No buffers at all is a valid layout too.
  EXPECT_TRUE(accepted(WsProtocol::legacy, FrameKind::binary, legacy_layout(js, {}))
                  .message.buffers.empty());
}

TEST(GatewayWsCodec, TextFrameHoldingTheBinaryLayoutIsAcceptedQuirkH2) {
  // jupyter_server 1.23 relays a browser's binary frame as a text frame (golden_test.cpp has the
  // bytes it really sends); the first byte, NUL, tells the layout from JSON.
  const std::string js = std::string(R"({"header":)") + kHeader + R"(,"channel":"shell"})";
  const std::string layout = legacy_layout(js, {std::string("\x80\x81\xfe", 3)});
  const auto as_text = accepted(WsProtocol::legacy, FrameKind::text, layout);
  const auto as_binary = accepted(WsProtocol::legacy, FrameKind::binary, layout);
  EXPECT_EQ(as_text.message.buffers, as_binary.message.buffers);
  EXPECT_EQ(as_text.message.header, as_binary.message.header);
  // A NUL-led text frame that is not the layout is refused as framing, not as JSON.
  EXPECT_EQ(refused(WsProtocol::legacy, FrameKind::text, std::string("\0\0\0\0", 4)).fault,
            Fault::malformed);
}

TEST(GatewayWsCodec, LegacyBinaryLayoutErrors) {
  const std::string js = std::string(R"({"header":)") + kHeader + "}";
  const std::string good = legacy_layout(js, {"abc", "de"});
  auto with_u32 = [&](std::size_t at, std::uint32_t v) {
    std::string s = good;
    s.replace(at, 4, be32(v));
    return s;
  };
  WsLimits limits;
  limits.max_buffers = 4;
  struct Case {
    std::string frame;
    const char* what;
  } cases[] = {
      {good.substr(0, 7), "shorter than the table"},
      {with_u32(0, 0), "no parts"},
      {with_u32(0, 6), "more buffers than the limit"},
      {with_u32(0, 3).substr(0, 12), "table cut off"},
      {with_u32(4, 12), "first offset not the table's end"},
      {with_u32(8, 10), "offset before the previous"},
      {with_u32(12, static_cast<std::uint32_t>(good.size() + 1)), "offset past the end"},
  };
  for (const auto& c : cases)
    EXPECT_EQ(refused(WsProtocol::legacy, FrameKind::binary, c.frame, limits).fault,
              Fault::malformed)
        << c.what;
  EXPECT_EQ(refused(WsProtocol::legacy, FrameKind::binary, legacy_layout("{nope", {})).fault,
            Fault::bad_json);
  EXPECT_EQ(refused(WsProtocol::legacy, FrameKind::binary, legacy_layout(R"({"x":1})", {})).fault,
            Fault::bad_message);
}

TEST(GatewayWsCodec, V1FrameAsJupyterLab4SendsIt) {
  const std::vector<std::string> parts = {kHeader, "{}", "{}", R"({"code":"x"})", "buf\x01"};
  const auto frame = v1_layout("shell", parts);
  const auto m = accepted(WsProtocol::v1, FrameKind::binary, frame);
  EXPECT_EQ(m.channel, Channel::shell);
  EXPECT_EQ(m.message.header, kHeader);  // raw bytes, not re-printed
  EXPECT_EQ(m.message.content, R"({"code":"x"})");
  EXPECT_EQ(m.message.buffers, std::vector<std::string>{"buf\x01"});
  // The opcode does not matter in v1: the same bytes in a text frame are the same message.
  EXPECT_EQ(accepted(WsProtocol::v1, FrameKind::text, frame).message.buffers, m.message.buffers);
}

TEST(GatewayWsCodec, V1LayoutErrors) {
  const std::vector<std::string> parts = {kHeader, "{}", "{}", "{}"};
  const std::string good = v1_layout("control", parts);
  auto with_u64 = [&](std::size_t at, std::uint64_t v) {
    std::string s = good;
    s.replace(at, 8, le64(v));
    return s;
  };
  struct Case {
    std::string frame;
    Fault fault;
    const char* what;
  } cases[] = {
      {good.substr(0, 5), Fault::malformed, "shorter than 8 bytes"},
      {with_u64(0, 5), Fault::malformed, "fewer than six offsets"},
      {with_u64(0, 1u << 30), Fault::malformed, "too many offsets"},
      {with_u64(0, 7), Fault::malformed, "table cut off or first offset wrong"},
      {with_u64(8, 8), Fault::malformed, "first offset not the table's end"},
      {with_u64(16, 50), Fault::malformed, "offset before the previous"},
      {good + "x", Fault::malformed, "bytes after the last part"},
      {with_u64(48, good.size() + 1), Fault::malformed, "last offset past the end"},
      {v1_layout("iopub", parts), Fault::bad_channel, "iopub from a client"},
      {v1_layout("", parts), Fault::bad_channel, "empty channel"},
      {v1_layout("shell", {"nope", "{}", "{}", "{}"}), Fault::bad_json, "header not JSON"},
      {v1_layout("shell", {"{}", "{}", "{}", "{}"}), Fault::bad_message, "header without msg_id"},
      {v1_layout("shell", {kHeader, "{}", "{}", "[]"}), Fault::bad_json, "content no object"},
      {v1_layout("shell", {kHeader, "{}", "{", "{}"}), Fault::bad_json, "metadata not JSON"},
  };
  for (const auto& c : cases)
    EXPECT_EQ(refused(WsProtocol::v1, FrameKind::binary, c.frame).fault, c.fault) << c.what;
}

TEST(GatewayWsCodec, SizeLimitBothWays) {
  WsLimits limits;
  limits.max_message = 64;
  const std::string big(65, '{');
  EXPECT_EQ(refused(WsProtocol::legacy, FrameKind::text, big, limits).fault, Fault::too_large);
  EXPECT_EQ(refused(WsProtocol::v1, FrameKind::binary, big, limits).fault, Fault::too_large);
  for (auto p : {WsProtocol::legacy, WsProtocol::v1}) {
    for (auto& m : {kernel_message(), kernel_message({"b"})}) {
      auto r = encode_kernel_message(p, Channel::iopub, m, limits);
      ASSERT_TRUE(std::holds_alternative<GatewayError>(r));
      EXPECT_EQ(std::get<GatewayError>(r).fault, Fault::too_large);
    }
  }
}

TEST(GatewayWsCodec, LegacyOutboundTextCarriesMsgIdTypeAndChannel) {
  auto r = encode_kernel_message(WsProtocol::legacy, Channel::iopub, kernel_message());
  ASSERT_TRUE(std::holds_alternative<WsFrame>(r));
  const auto& frame = std::get<WsFrame>(r);
  EXPECT_EQ(frame.kind, FrameKind::text);
  const auto j = json::parse(frame.payload);
  EXPECT_EQ(j["msg_id"], "m-1");
  EXPECT_EQ(j["msg_type"], "comm_msg");
  EXPECT_EQ(j["channel"], "iopub");
  EXPECT_EQ(j["buffers"], json::array());
  EXPECT_EQ(j["header"], json::parse(kHeader));
  EXPECT_EQ(j["parent_header"]["msg_id"], "p-1");
  EXPECT_EQ(j["content"]["data"]["x"], "\u00e9");
  EXPECT_EQ(frame.payload.find("not-for-the-client"), std::string::npos);
}

TEST(GatewayWsCodec, LegacyOutboundWithBuffersIsBinaryAndReadsBack) {
  const std::vector<std::string> buffers = {std::string("\x00\x01", 2), "", "third"};
  auto r = encode_kernel_message(WsProtocol::legacy, Channel::shell, kernel_message(buffers));
  ASSERT_TRUE(std::holds_alternative<WsFrame>(r));
  const auto& frame = std::get<WsFrame>(r);
  EXPECT_EQ(frame.kind, FrameKind::binary);
  EXPECT_EQ(frame.payload.substr(0, 8), be32(4) + be32(20));
  const auto back = accepted(WsProtocol::legacy, FrameKind::binary, frame.payload);
  EXPECT_EQ(back.channel, Channel::shell);
  EXPECT_EQ(back.message.buffers, buffers);
  EXPECT_EQ(json::parse(back.message.content), json::parse(kernel_message().content));
}

TEST(GatewayWsCodec, V1OutboundIsTheLayoutWithRawParts) {
  const auto m = kernel_message({"B1", "b2"});
  auto r = encode_kernel_message(WsProtocol::v1, Channel::stdin_channel, m);
  ASSERT_TRUE(std::holds_alternative<WsFrame>(r));
  const auto& frame = std::get<WsFrame>(r);
  EXPECT_EQ(frame.kind, FrameKind::binary);
  EXPECT_EQ(frame.payload,
            v1_layout("stdin", {m.header, m.parent_header, m.metadata, m.content, "B1", "b2"}));
  const auto back = accepted(WsProtocol::v1, FrameKind::binary, frame.payload);
  EXPECT_EQ(back.channel, Channel::stdin_channel);
  EXPECT_EQ(back.message.header, m.header);
  EXPECT_EQ(back.message.buffers, m.buffers);
}

TEST(GatewayWsCodec, LegacyOutboundRefusesWhatItCannotSplice) {
  auto m = kernel_message();
  m.content = "[]";
  auto r = encode_kernel_message(WsProtocol::legacy, Channel::iopub, m);
  ASSERT_TRUE(std::holds_alternative<GatewayError>(r));
  EXPECT_EQ(std::get<GatewayError>(r).fault, Fault::bad_json);
  m = kernel_message();
  m.header = R"({"msg_type":"status"})";
  r = encode_kernel_message(WsProtocol::legacy, Channel::iopub, m);
  ASSERT_TRUE(std::holds_alternative<GatewayError>(r));
  EXPECT_EQ(std::get<GatewayError>(r).fault, Fault::bad_message);
}

TEST(GatewayWsCodec, ChannelNames) {
  for (auto c : {Channel::shell, Channel::control, Channel::stdin_channel, Channel::iopub})
    EXPECT_EQ(channel_from_name(to_string(c)), c);
  EXPECT_EQ(channel_from_name("hb"), std::nullopt);
  EXPECT_STREQ(to_string(Channel::stdin_channel), "stdin");
}

}  // namespace
}  // namespace kb::gateway
