// Tests gateway/jupyter_message.*: the signed ZeroMQ form of a Jupyter message. Signatures made by
// jupyter_client itself are checked in golden_test.cpp.
#include "gateway/jupyter_message.hpp"

#include "common/text.hpp"

#include <gtest/gtest.h>

namespace kb::gateway {
namespace {

constexpr const char* kKey = "a-kernel-key";

MessageSigner signer(const std::string& key = kKey) {
  return std::get<MessageSigner>(MessageSigner::create(key));
}

JupyterMessage sample() {
  JupyterMessage m;
  m.identities = {"session-id"};
  m.header = R"({"msg_id":"m-1","msg_type":"execute_request","session":"s-1"})";
  m.parent_header = "{}";
  m.metadata = R"({"trusted":true})";
  m.content = R"js({"code":"print('h\u00e9')","silent":false})js";
  m.buffers = {std::string("\x00\x01\xff", 3), ""};
  return m;
}

std::vector<std::string> wire(const JupyterMessage& m, const MessageSigner& s = signer()) {
  return std::get<std::vector<std::string>>(serialize(m, s));
}

GatewayError refused(const std::vector<std::string>& parts, const MessageSigner& s = signer(),
                     SignatureHistory* history = nullptr, const MessageLimits& limits = {}) {
  auto r = parse(parts, s, history, limits);
  EXPECT_TRUE(std::holds_alternative<GatewayError>(r)) << "accepted";
  if (auto* e = std::get_if<GatewayError>(&r)) {
    EXPECT_FALSE(e->message.empty());
    return *e;
  }
  return {Fault::crypto, ""};
}

TEST(GatewayJupyterMessage, SerializeLaysOutPartsInWireOrder) {
  const auto parts = wire(sample());
  ASSERT_EQ(parts.size(), 9u);
  EXPECT_EQ(parts[0], "session-id");
  EXPECT_EQ(parts[1], "<IDS|MSG>");
  EXPECT_EQ(parts[2].size(), 64u);
  EXPECT_EQ(parts[2].find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(parts[3], sample().header);
  EXPECT_EQ(parts[6], sample().content);
  EXPECT_EQ(parts[7], std::string("\x00\x01\xff", 3));
  EXPECT_EQ(parts[8], "");
}

TEST(GatewayJupyterMessage, ParseOfSerializeGivesTheMessageBack) {
  const auto m = sample();
  auto r = parse(wire(m), signer());
  ASSERT_TRUE(std::holds_alternative<JupyterMessage>(r)) << std::get<GatewayError>(r).message;
  const auto& back = std::get<JupyterMessage>(r);
  EXPECT_EQ(back.identities, m.identities);
  EXPECT_EQ(back.header, m.header);
  EXPECT_EQ(back.parent_header, m.parent_header);
  EXPECT_EQ(back.metadata, m.metadata);
  EXPECT_EQ(back.content, m.content);
  EXPECT_EQ(back.buffers, m.buffers);
  EXPECT_EQ(back.size(), m.size());
}

TEST(GatewayJupyterMessage, SignatureCoversEachJsonPart) {
  for (std::size_t part = 3; part <= 6; ++part) {
    auto parts = wire(sample());
    parts[part].insert(parts[part].size() - 1,
                       " ");  // still a JSON object, but not what was signed
    EXPECT_EQ(refused(parts).fault, Fault::bad_signature) << "part " << part;
  }
}

TEST(GatewayJupyterMessage, BuffersAndIdentitiesAreNotSigned) {
  // As in jupyter_client: the HMAC covers the four JSON parts only.
  auto parts = wire(sample());
  parts[0] = "another-peer";
  parts[7] = "changed";
  EXPECT_TRUE(std::holds_alternative<JupyterMessage>(parse(parts, signer())));
}

TEST(GatewayJupyterMessage, WrongKeyMissingOrMalformedSignatureRefused) {
  const auto parts = wire(sample());
  EXPECT_EQ(refused(parts, signer("another-key")).fault, Fault::bad_signature);
  auto missing = parts;
  missing[2] = "";
  EXPECT_EQ(refused(missing).fault, Fault::missing_signature);
  auto short_sig = parts;
  short_sig[2].pop_back();
  EXPECT_EQ(refused(short_sig).fault, Fault::bad_signature);
  auto upper = parts;  // the right digest in capitals: jupyter_client compares the text
  for (auto& c : upper[2]) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  ASSERT_NE(upper[2], parts[2]);
  EXPECT_EQ(refused(upper).fault, Fault::bad_signature);
  const auto e = refused(short_sig);
  EXPECT_EQ(e.message.find(short_sig[2]), std::string::npos) << "an error quotes the signature";
  EXPECT_EQ(e.message.find(kKey), std::string::npos);
}

TEST(GatewayJupyterMessage, ReplayRefusedWithHistory) {
  SignatureHistory history;
  const auto parts = wire(sample());
  EXPECT_TRUE(std::holds_alternative<JupyterMessage>(parse(parts, signer(), &history)));
  EXPECT_EQ(refused(parts, signer(), &history).fault, Fault::duplicate_signature);
  EXPECT_TRUE(std::holds_alternative<JupyterMessage>(parse(parts, signer())));  // no history
  // A forged message never enters the history.
  auto forged = parts;
  forged[2][0] = forged[2][0] == 'a' ? 'b' : 'a';
  EXPECT_EQ(refused(forged, signer(), &history).fault, Fault::bad_signature);
  EXPECT_EQ(history.size(), 1u);
}

TEST(GatewayJupyterMessage, HistoryForgetsTheOldestBeyondCapacity) {
  SignatureHistory history(2);
  std::vector<std::vector<std::string>> messages;
  for (int i = 0; i < 3; ++i) {
    auto m = sample();
    m.header = R"({"msg_id":"m-)" + std::to_string(i) + R"(","msg_type":"status"})";
    messages.push_back(wire(m));
    ASSERT_TRUE(std::holds_alternative<JupyterMessage>(parse(messages.back(), signer(), &history)));
  }
  EXPECT_EQ(history.size(), 2u);
  EXPECT_TRUE(std::holds_alternative<JupyterMessage>(parse(messages[0], signer(), &history)));
  EXPECT_EQ(refused(messages[2], signer(), &history).fault, Fault::duplicate_signature);
}

TEST(GatewayJupyterMessage, EmptyKeyIsAnUnsignedSession) {
  const auto unsigned_signer = signer("");
  EXPECT_FALSE(unsigned_signer.signs());
  const auto parts = wire(sample(), unsigned_signer);
  EXPECT_EQ(parts[2], "");
  auto other = parts;
  other[2] = "anything";
  EXPECT_TRUE(std::holds_alternative<JupyterMessage>(parse(other, unsigned_signer)));
}

TEST(GatewayJupyterMessage, OnlyHmacSha256) {
  auto r = MessageSigner::create(kKey, "hmac-md5");
  ASSERT_TRUE(std::holds_alternative<GatewayError>(r));
  EXPECT_NE(std::get<GatewayError>(r).message.find("hmac-md5"), std::string::npos);
}

TEST(GatewayJupyterMessage, FramingErrors) {
  const auto good = wire(sample());
  std::vector<std::string> no_delimiter(good.begin() + 2, good.end());
  EXPECT_EQ(refused(no_delimiter).fault, Fault::malformed);
  std::vector<std::string> too_few(good.begin(), good.begin() + 6);  // no content part
  EXPECT_EQ(refused(too_few).fault, Fault::malformed);
  EXPECT_EQ(refused({}).fault, Fault::malformed);
  auto many_ids = good;
  many_ids.insert(many_ids.begin(), 16, "id");
  EXPECT_EQ(refused(many_ids).fault, Fault::malformed);
  auto long_id = good;
  long_id[0] = std::string(256, 'x');
  EXPECT_EQ(refused(long_id).fault, Fault::malformed);
  // The first delimiter ends the identities; a later one is just a buffer.
  auto m = sample();
  m.buffers = {"<IDS|MSG>"};
  auto r = parse(wire(m), signer());
  ASSERT_TRUE(std::holds_alternative<JupyterMessage>(r));
  EXPECT_EQ(std::get<JupyterMessage>(r).buffers, m.buffers);
}

TEST(GatewayJupyterMessage, SizeLimits) {
  MessageLimits limits;
  limits.max_part = 100;
  auto m = sample();
  m.content = R"({"text":")" + std::string(200, 'x') + R"("})";
  EXPECT_EQ(refused(wire(m), signer(), nullptr, limits).fault, Fault::too_large);
  limits = {};
  limits.max_total = 150;
  m = sample();
  m.buffers = {std::string(100, 'b')};
  EXPECT_EQ(refused(wire(m), signer(), nullptr, limits).fault, Fault::too_large);
  limits = {};
  limits.max_buffers = 1;
  m.buffers = {"a", "b"};
  EXPECT_EQ(refused(wire(m), signer(), nullptr, limits).fault, Fault::too_large);
}

TEST(GatewayJupyterMessage, JsonPartsMustBeObjects) {
  struct Case {
    std::size_t part;
    std::string text;
    Fault fault;
  } cases[] = {
      {3, "not json", Fault::bad_json},
      {3, "[]", Fault::bad_json},
      {3, R"({"msg_type":"x"})", Fault::bad_message},
      {3, R"({"msg_id":"m","msg_type":7})", Fault::bad_message},
      {3, R"({"msg_id":"","msg_type":"x"})", Fault::bad_message},
      {3, R"({"msg_id":"m","msg_type":"x","session":1})", Fault::bad_message},
      {4, "null", Fault::bad_json},
      {5, "{", Fault::bad_json},
      {6, "[1]", Fault::bad_json},
      {6, "{\"a\":\"\xff\"}", Fault::bad_json},  // not UTF-8
      {6, "{} {}", Fault::bad_json},
      {4, std::string("{} \0garbage", 11), Fault::bad_json},  // a parser could stop at the NUL
      {3, "\xef\xbb\xbf{\"msg_id\":\"m\",\"msg_type\":\"x\"}", Fault::bad_json},  // a BOM
      {3, std::string(R"({"msg_id":"m","msg_type":"x"})") + std::string("\0}", 2), Fault::bad_json},
      {6, R"({"a":)" + std::string(300, '[') + std::string(300, ']') + "}", Fault::bad_json},
      {3, R"({"msg_id":"m","msg_type":"x","a":)" + std::string(300, '{') + "}", Fault::bad_json},
  };
  for (const auto& c : cases) {
    auto m = sample();
    std::string* parts[] = {&m.header, &m.parent_header, &m.metadata, &m.content};
    *parts[c.part - 3] = c.text;
    EXPECT_EQ(refused(wire(m)).fault, c.fault) << c.text;
  }
}

TEST(GatewayJupyterMessage, NestingDepthIsBounded) {
  auto nested = [](std::size_t n) {
    return R"({"a":)" + std::string(n, '[') + std::string(n, ']') + "}";
  };
  EXPECT_TRUE(is_json_object(nested(kMaxJsonDepth - 1)));
  EXPECT_FALSE(is_json_object(nested(kMaxJsonDepth)));
  // Brackets inside strings do not count, escaped quotes do not end a string.
  EXPECT_TRUE(json_depth_within(R"({"s":"[[[[\"[[[["})", 1));
  EXPECT_FALSE(json_depth_within("[[", 1));
  auto m = sample();
  m.content = nested(200);
  EXPECT_TRUE(std::holds_alternative<JupyterMessage>(parse(wire(m), signer())));
}

TEST(GatewayJupyterMessage, ReadHeader) {
  auto r = read_header(R"( {"msg_id":"a","msg_type":"kernel_info_request","session":"s","x":1} )");
  ASSERT_TRUE(std::holds_alternative<HeaderFields>(r));
  EXPECT_EQ(std::get<HeaderFields>(r).msg_id, "a");
  EXPECT_EQ(std::get<HeaderFields>(r).msg_type, "kernel_info_request");
  EXPECT_EQ(std::get<HeaderFields>(r).session, "s");
  EXPECT_TRUE(is_json_object(" {\"a\": [1, {}]}\n"));
  EXPECT_FALSE(is_json_object("\"{}\""));
  EXPECT_FALSE(is_json_object(""));
}

}  // namespace
}  // namespace kb::gateway
