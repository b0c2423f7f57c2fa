#pragma once
// WebSocket frames of /api/kernels/{id}/channels to and from Jupyter messages, in both protocols
// jupyter_server speaks (jupyter_server base/zmqhandlers.py; JupyterLab kernel/serialize.ts):
//  - legacy (no subprotocol): a text frame is one JSON message with a "channel" field; a binary
//    frame is [u32 BE nbufs][nbufs × u32 BE offsets][JSON without "buffers"][buffers…]. A text
//    frame whose first byte is NUL is read as that binary layout: jupyter_server 1.23 relays
//    binary frames as text (docs/gateway.md, quirk H2).
//  - "v1.kernel.websocket.jupyter.org": [u64 LE n][n × u64 LE offsets][channel][header]
//    [parent_header][metadata][content][buffers…], the parts kept as raw bytes.
// Every malformed frame is a GatewayError; nothing throws. Pure functions, callable from any
// thread.
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "gateway/gateway_error.hpp"
#include "gateway/jupyter_message.hpp"

namespace kb::gateway {

enum class WsProtocol { legacy, v1 };
inline constexpr std::string_view kV1Subprotocol = "v1.kernel.websocket.jupyter.org";
const char* to_string(WsProtocol protocol);

// The protocol for a client's Sec-WebSocket-Protocol offer (comma-separated tokens, as one header
// value): v1 if it is among them, else legacy (and the server selects no subprotocol).
WsProtocol choose_protocol(std::string_view offered);

enum class Channel { shell, control, stdin_channel, iopub };
const char* to_string(Channel channel);  // "shell", "control", "stdin", "iopub"
std::optional<Channel> channel_from_name(std::string_view name);

enum class FrameKind { text, binary };  // WebSocket opcodes 0x1 and 0x2
struct WsFrame {
  FrameKind kind = FrameKind::binary;
  std::string payload;
};

struct WsLimits {
  std::size_t max_message = 32 * 1024 * 1024;  // one frame's payload, either way
  std::size_t max_buffers = 1024;
};

// A message a client sent, ready to be signed and sent on `channel` (identities are empty: the
// caller adds the connection's own).
struct ClientMessage {
  Channel channel = Channel::shell;
  JupyterMessage message;
  HeaderFields header;
};

// One frame from the client. Legacy: a missing or null "channel" means shell; iopub is refused
// (kernel-to-client only). v1: the opcode carries no meaning, the bytes must be the v1 layout.
Result<ClientMessage> decode_client_frame(WsProtocol protocol, FrameKind kind,
                                          std::string_view payload, const WsLimits& limits = {});

// One kernel message for the client on `channel`. Legacy: a text frame with top-level msg_id and
// msg_type, or the binary layout if the message has buffers. v1: always a binary frame, the parts
// relayed as they are (parse() has checked them). `message` is as parse() returns it.
Result<WsFrame> encode_kernel_message(WsProtocol protocol, Channel channel,
                                      const JupyterMessage& message, const WsLimits& limits = {});

}  // namespace kb::gateway
