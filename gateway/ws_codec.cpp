#include "gateway/ws_codec.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <vector>

#include "common/text.hpp"

namespace kb::gateway {

namespace {

using json = nlohmann::json;

GatewayError error(Fault fault, std::string message) {
  return {fault, std::move(message)};
}

std::uint32_t get_u32_be(std::string_view s, std::size_t at) {
  return static_cast<std::uint32_t>(static_cast<unsigned char>(s[at])) << 24 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(s[at + 1])) << 16 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(s[at + 2])) << 8 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(s[at + 3]));
}

std::uint64_t get_u64_le(std::string_view s, std::size_t at) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | static_cast<unsigned char>(s[at + i]);
  return v;
}

void put_u32_be(std::string& out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>(v >> shift & 0xff));
}

void put_u64_le(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i) & 0xff));
}

// The channel a client names: one the gateway forwards to the kernel.
Result<Channel> client_channel(std::string_view name) {
  const auto channel = channel_from_name(name);
  if (!channel)
    return error(Fault::bad_channel,
                 "no channel \"" + printable(name, 32) + "\" (shell, control or stdin)");
  if (*channel == Channel::iopub)
    return error(Fault::bad_channel, "iopub carries kernel-to-client messages only");
  return *channel;
}

// A legacy JSON message (a text frame's whole payload, or a binary frame's first part) into a
// ClientMessage without buffers. `in_text_frame`: "buffers" must then be absent or empty.
Result<ClientMessage> from_legacy_json(std::string_view text, bool in_text_frame) {
  // One level for the message itself, so its parts may nest as deep as anywhere else.
  if (!json_depth_within(text, kMaxJsonDepth + 1))
    return error(Fault::bad_json, "the message nests deeper than " + std::to_string(kMaxJsonDepth));
  if (text.find('\0') != std::string_view::npos)  // nlohmann's parser would stop there
    return error(Fault::bad_json, "the message holds a NUL byte, which JSON never does");
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return error(Fault::bad_json, "the message is not JSON (or not UTF-8)");
  if (!j.is_object()) return error(Fault::bad_json, "the message is not a JSON object");
  ClientMessage out;
  if (const auto it = j.find("channel"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) return error(Fault::bad_channel, "\"channel\" is not a string");
    auto channel = client_channel(it->get_ref<const std::string&>());
    if (auto* e = std::get_if<GatewayError>(&channel)) return *e;
    out.channel = std::get<Channel>(channel);
  }
  const auto header = j.find("header");
  if (header == j.end() || !header->is_object())
    return error(Fault::bad_message, "the message has no \"header\" object");
  out.message.header = header->dump();
  for (auto [name, part] : {std::pair{"parent_header", &out.message.parent_header},
                            {"metadata", &out.message.metadata},
                            {"content", &out.message.content}}) {
    const auto it = j.find(name);
    if (it == j.end() || it->is_null()) continue;  // stays "{}"
    if (!it->is_object())
      return error(Fault::bad_message, std::string("\"") + name + "\" is not an object");
    *part = it->dump();
  }
  if (in_text_frame) {
    if (const auto it = j.find("buffers"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) return error(Fault::bad_message, "\"buffers\" is not an array");
      if (!it->empty())
        return error(Fault::bad_message,
                     "a text frame cannot carry buffers; send the binary layout instead");
    }
  }
  auto fields = read_header(out.message.header);
  if (auto* e = std::get_if<GatewayError>(&fields)) return *e;
  out.header = std::move(std::get<HeaderFields>(fields));
  return out;
}

// [u32 BE nbufs][nbufs offsets][JSON][buffers…], offsets from the frame's start.
Result<ClientMessage> from_legacy_binary(std::string_view frame, const WsLimits& limits) {
  if (frame.size() < 8)
    return error(Fault::malformed, "a binary message of " + std::to_string(frame.size()) +
                                       " bytes is shorter than its part table");
  const std::uint32_t nbufs = get_u32_be(frame, 0);
  if (nbufs == 0 || nbufs - 1 > limits.max_buffers)
    return error(Fault::malformed, "the binary message declares " + std::to_string(nbufs) +
                                       " parts (1 to " + std::to_string(limits.max_buffers + 1) +
                                       ")");
  const std::size_t table = 4 * (static_cast<std::size_t>(nbufs) + 1);
  if (frame.size() < table)
    return error(Fault::malformed, "the binary message's offset table (" + std::to_string(table) +
                                       " bytes) is cut off");
  std::vector<std::size_t> offsets(nbufs);
  for (std::size_t i = 0; i < nbufs; ++i) offsets[i] = get_u32_be(frame, 4 * (i + 1));
  if (offsets[0] != table)
    return error(Fault::malformed, "the first offset is " + std::to_string(offsets[0]) +
                                       ", not the table's end " + std::to_string(table));
  for (std::size_t i = 1; i < nbufs; ++i) {
    if (offsets[i] < offsets[i - 1] || offsets[i] > frame.size())
      return error(Fault::malformed, "offset " + std::to_string(i) + " (" +
                                         std::to_string(offsets[i]) +
                                         ") is out of order or past the end");
  }
  auto part = [&](std::size_t i) {
    const std::size_t end = i + 1 < nbufs ? offsets[i + 1] : frame.size();
    return frame.substr(offsets[i], end - offsets[i]);
  };
  auto out = from_legacy_json(part(0), /*in_text_frame=*/false);
  if (auto* m = std::get_if<ClientMessage>(&out)) {
    for (std::size_t i = 1; i < nbufs; ++i) m->message.buffers.emplace_back(part(i));
  }
  return out;
}

// [u64 LE n][n offsets][channel][header][parent_header][metadata][content][buffers…]
Result<ClientMessage> from_v1(std::string_view frame, const WsLimits& limits) {
  if (frame.size() < 8) return error(Fault::malformed, "a v1 message shorter than 8 bytes");
  const std::uint64_t n = get_u64_le(frame, 0);
  if (n < 6 || n - 6 > limits.max_buffers)
    return error(Fault::malformed, "the v1 message declares " + std::to_string(n) +
                                       " offsets (6 to " + std::to_string(limits.max_buffers + 6) +
                                       ")");
  const std::size_t table = 8 * (static_cast<std::size_t>(n) + 1);
  if (frame.size() < table)
    return error(Fault::malformed,
                 "the v1 offset table (" + std::to_string(table) + " bytes) is cut off");
  std::vector<std::uint64_t> offsets(n);
  for (std::size_t i = 0; i < n; ++i) offsets[i] = get_u64_le(frame, 8 * (i + 1));
  if (offsets[0] != table)
    return error(Fault::malformed, "the first v1 offset is " + std::to_string(offsets[0]) +
                                       ", not the table's end " + std::to_string(table));
  for (std::size_t i = 1; i < n; ++i) {
    if (offsets[i] < offsets[i - 1] || offsets[i] > frame.size())
      return error(Fault::malformed, "v1 offset " + std::to_string(i) + " (" +
                                         std::to_string(offsets[i]) +
                                         ") is out of order or past the end");
  }
  if (offsets[n - 1] != frame.size())
    return error(Fault::malformed, "the last v1 offset (" + std::to_string(offsets[n - 1]) +
                                       ") is not the frame's end (" + std::to_string(frame.size()) +
                                       ")");
  auto part = [&](std::size_t i) { return frame.substr(offsets[i], offsets[i + 1] - offsets[i]); };
  auto channel = client_channel(part(0));
  if (auto* e = std::get_if<GatewayError>(&channel)) return *e;
  ClientMessage out;
  out.channel = std::get<Channel>(channel);
  out.message.header = part(1);
  out.message.parent_header = part(2);
  out.message.metadata = part(3);
  out.message.content = part(4);
  for (std::size_t i = 5; i + 1 < n; ++i) out.message.buffers.emplace_back(part(i));
  auto fields = read_header(out.message.header);
  if (auto* e = std::get_if<GatewayError>(&fields)) return *e;
  out.header = std::move(std::get<HeaderFields>(fields));
  for (auto [name, p] : {std::pair{"parent_header", &out.message.parent_header},
                         {"metadata", &out.message.metadata},
                         {"content", &out.message.content}}) {
    if (!is_json_object(*p))
      return error(Fault::bad_json, std::string("the v1 ") + name + " is not a JSON object");
  }
  return out;
}

}  // namespace

const char* to_string(WsProtocol protocol) {
  return protocol == WsProtocol::v1 ? "v1.kernel.websocket.jupyter.org" : "legacy";
}

WsProtocol choose_protocol(std::string_view offered) {
  while (!offered.empty()) {
    const auto comma = offered.find(',');
    std::string_view token = offered.substr(0, comma);
    while (!token.empty() && (token.front() == ' ' || token.front() == '\t'))
      token.remove_prefix(1);
    while (!token.empty() && (token.back() == ' ' || token.back() == '\t')) token.remove_suffix(1);
    if (token == kV1Subprotocol) return WsProtocol::v1;
    if (comma == std::string_view::npos) break;
    offered.remove_prefix(comma + 1);
  }
  return WsProtocol::legacy;
}

const char* to_string(Channel channel) {
  switch (channel) {
    case Channel::shell:
      return "shell";
    case Channel::control:
      return "control";
    case Channel::stdin_channel:
      return "stdin";
    case Channel::iopub:
      return "iopub";
  }
  return "unknown";
}

std::optional<Channel> channel_from_name(std::string_view name) {
  for (auto c : {Channel::shell, Channel::control, Channel::stdin_channel, Channel::iopub}) {
    if (name == to_string(c)) return c;
  }
  return std::nullopt;
}

Result<ClientMessage> decode_client_frame(WsProtocol protocol, FrameKind kind,
                                          std::string_view payload, const WsLimits& limits) {
  if (payload.size() > limits.max_message)
    return error(Fault::too_large, "a frame of " + std::to_string(payload.size()) +
                                       " bytes is above the limit of " +
                                       std::to_string(limits.max_message));
  try {
    if (protocol == WsProtocol::v1) return from_v1(payload, limits);
    // JSON never starts with NUL; the binary layout's big-endian part count does (below 2^24).
    if (kind == FrameKind::binary || (!payload.empty() && payload[0] == '\0'))
      return from_legacy_binary(payload, limits);
    return from_legacy_json(payload, /*in_text_frame=*/true);
  } catch (const std::exception& e) {  // json::dump or allocation; the frame is refused, not fatal
    return error(Fault::bad_json, std::string("the message could not be read: ") + e.what());
  }
}

namespace {

Result<WsFrame> to_legacy(Channel channel, const JupyterMessage& m, const WsLimits& limits) {
  auto fields = read_header(m.header);
  if (auto* e = std::get_if<GatewayError>(&fields)) return *e;
  for (auto [name, part] : {std::pair{"parent_header", &m.parent_header},
                            {"metadata", &m.metadata},
                            {"content", &m.content}}) {
    if (!is_json_object(*part))
      return error(Fault::bad_json, std::string("the kernel's ") + name + " is not a JSON object");
  }
  const auto& h = std::get<HeaderFields>(fields);
  // The parts are spliced in as the kernel wrote them: a message is never parsed and re-printed.
  std::string text;
  text.reserve(m.header.size() + m.parent_header.size() + m.metadata.size() + m.content.size() +
               h.msg_id.size() + h.msg_type.size() + 128);
  text += "{\"header\":" + m.header;
  text += ",\"msg_id\":" + json(h.msg_id).dump();
  text += ",\"msg_type\":" + json(h.msg_type).dump();
  text += ",\"parent_header\":" + m.parent_header;
  text += ",\"metadata\":" + m.metadata;
  text += ",\"content\":" + m.content;
  text += ",\"channel\":\"" + std::string(to_string(channel)) + "\"";
  if (m.buffers.empty()) {
    text += ",\"buffers\":[]}";
    if (text.size() > limits.max_message)
      return error(Fault::too_large, "the kernel's message of " + std::to_string(text.size()) +
                                         " bytes is above the limit of " +
                                         std::to_string(limits.max_message));
    return WsFrame{FrameKind::text, std::move(text)};
  }
  text += "}";
  const std::size_t nbufs = 1 + m.buffers.size();
  std::size_t total = 4 * (nbufs + 1) + text.size();
  for (const auto& b : m.buffers) total += b.size();
  if (total > limits.max_message || total > std::numeric_limits<std::uint32_t>::max())
    return error(Fault::too_large, "the kernel's message of " + std::to_string(total) +
                                       " bytes is above the limit of " +
                                       std::to_string(limits.max_message));
  WsFrame frame{FrameKind::binary, {}};
  frame.payload.reserve(total);
  put_u32_be(frame.payload, static_cast<std::uint32_t>(nbufs));
  std::size_t offset = 4 * (nbufs + 1);
  put_u32_be(frame.payload, static_cast<std::uint32_t>(offset));
  offset += text.size();
  for (const auto& b : m.buffers) {  // where each buffer starts
    put_u32_be(frame.payload, static_cast<std::uint32_t>(offset));
    offset += b.size();
  }
  frame.payload += text;
  for (const auto& b : m.buffers) frame.payload += b;
  return frame;
}

Result<WsFrame> to_v1(Channel channel, const JupyterMessage& m, const WsLimits& limits) {
  const std::string_view name = to_string(channel);
  const std::string_view parts[] = {m.header, m.parent_header, m.metadata, m.content};
  const std::size_t n = 2 + 4 + m.buffers.size();  // channel start, 4 parts, buffers, the end
  std::size_t total = 8 * (n + 1) + name.size();
  for (auto p : parts) total += p.size();
  for (const auto& b : m.buffers) total += b.size();
  if (total > limits.max_message)
    return error(Fault::too_large, "the kernel's message of " + std::to_string(total) +
                                       " bytes is above the limit of " +
                                       std::to_string(limits.max_message));
  WsFrame frame{FrameKind::binary, {}};
  frame.payload.reserve(total);
  put_u64_le(frame.payload, n);
  std::uint64_t offset = 8 * (n + 1);
  put_u64_le(frame.payload, offset);
  offset += name.size();
  put_u64_le(frame.payload, offset);
  for (auto p : parts) put_u64_le(frame.payload, offset += p.size());
  for (const auto& b : m.buffers) put_u64_le(frame.payload, offset += b.size());
  frame.payload += name;
  for (auto p : parts) frame.payload += p;
  for (const auto& b : m.buffers) frame.payload += b;
  return frame;
}

}  // namespace

Result<WsFrame> encode_kernel_message(WsProtocol protocol, Channel channel,
                                      const JupyterMessage& message, const WsLimits& limits) {
  try {
    return protocol == WsProtocol::v1 ? to_v1(channel, message, limits)
                                      : to_legacy(channel, message, limits);
  } catch (const std::exception& e) {  // allocation; the message is dropped, not fatal
    return error(Fault::too_large, std::string("the message could not be encoded: ") + e.what());
  }
}

}  // namespace kb::gateway
