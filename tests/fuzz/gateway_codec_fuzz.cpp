// libFuzzer target: the gateway's WebSocket decoder and Jupyter message parser (gateway/ws_codec.*,
// gateway/jupyter_message.*), and the REST request readers beside them (gateway/kernel_request.*).
// The first input byte chooses what the rest is: 0 a legacy text frame, 1 a legacy binary frame,
// 2 a v1 frame, 3 a ZeroMQ multipart message (parts separated by the bytes FF FE) read unsigned
// and signed, 4 a POST /api/kernels body, 5 a kernelspecs path and query (split at the first "?").
// Invariants: nothing throws, nothing crashes; every refusal says why; an accepted frame is a
// message the gateway may forward (a client channel, a header with msg_id and msg_type, four JSON
// objects) that signs, parses back unchanged, and re-encodes for a client to the same message; no
// credential-looking variable passes the whitelist; resource overrides are within their ranges.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "gateway/jupyter_message.hpp"
#include "gateway/kernel_request.hpp"
#include "gateway/ws_codec.hpp"

namespace {

using namespace kb::gateway;

[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "gateway_codec_fuzz: invariant broken: %s\n", what);
  std::abort();
}

const MessageSigner& keyed() {
  static const MessageSigner s = std::get<MessageSigner>(MessageSigner::create("fuzz-key"));
  return s;
}

// The legacy protocol re-prints JSON (its parts are JSON values, not bytes); v1 keeps the bytes.
bool same_json(const std::string& a, const std::string& b, bool exact) {
  if (a == b) return true;
  return !exact &&
         nlohmann::json::parse(a, nullptr, false) == nlohmann::json::parse(b, nullptr, false);
}

bool same_parts(const JupyterMessage& a, const JupyterMessage& b, bool exact = true) {
  return same_json(a.header, b.header, exact) &&
         same_json(a.parent_header, b.parent_header, exact) &&
         same_json(a.metadata, b.metadata, exact) && same_json(a.content, b.content, exact) &&
         a.buffers == b.buffers;
}

void check_forwardable(const JupyterMessage& m) {
  if (!std::holds_alternative<HeaderFields>(read_header(m.header))) broken("a bad header passed");
  for (const auto* part : {&m.parent_header, &m.metadata, &m.content}) {
    if (!is_json_object(*part)) broken("a part that is no JSON object passed");
  }
}

// Signs `m`, parses it back (with a history: the first time is never a replay).
void check_signs(const JupyterMessage& m) {
  auto parts = serialize(m, keyed());
  if (!std::holds_alternative<std::vector<std::string>>(parts)) broken("serialize failed");
  SignatureHistory history;
  auto back = parse(std::get<std::vector<std::string>>(parts), keyed(), &history);
  if (!std::holds_alternative<JupyterMessage>(back)) broken("a signed message does not parse");
  if (!same_parts(std::get<JupyterMessage>(back), m)) broken("parse(serialize(m)) differs");
  auto again = parse(std::get<std::vector<std::string>>(parts), keyed(), &history);
  if (!std::holds_alternative<GatewayError>(again) ||
      std::get<GatewayError>(again).fault != Fault::duplicate_signature)
    broken("a replay was accepted");
}

// What the kernel would send back on the same channel reads as the same message.
void check_reencodes(WsProtocol protocol, const ClientMessage& in) {
  auto frame = encode_kernel_message(protocol, in.channel, in.message);
  if (auto* e = std::get_if<GatewayError>(&frame)) {
    if (e->fault != Fault::too_large) broken("an accepted message does not encode");
    return;
  }
  const auto& f = std::get<WsFrame>(frame);
  auto back = decode_client_frame(protocol, f.kind, f.payload);
  if (!std::holds_alternative<ClientMessage>(back)) broken("an encoded frame does not decode");
  const auto& m = std::get<ClientMessage>(back);
  if (m.channel != in.channel || !same_parts(m.message, in.message, protocol == WsProtocol::v1))
    broken("decode(encode(m)) differs");
}

void fuzz_frame(WsProtocol protocol, FrameKind kind, std::string_view payload) {
  WsLimits limits;
  limits.max_buffers = 64;
  auto r = decode_client_frame(protocol, kind, payload, limits);
  if (auto* e = std::get_if<GatewayError>(&r)) {
    if (e->message.empty()) broken("a refusal without a reason");
    return;
  }
  const auto& m = std::get<ClientMessage>(r);
  if (m.channel == Channel::iopub) broken("a client message on iopub");
  if (!m.message.identities.empty()) broken("identities from a client");
  if (m.message.buffers.size() > limits.max_buffers) broken("more buffers than the limit");
  check_forwardable(m.message);
  check_signs(m.message);
  check_reencodes(protocol, m);
}

void fuzz_multipart(std::string_view data) {
  std::vector<std::string> parts;
  for (;;) {
    const auto sep = data.find("\xff\xfe");
    parts.emplace_back(data.substr(0, sep));
    if (sep == std::string_view::npos) break;
    data.remove_prefix(sep + 2);
  }
  static const MessageSigner unsigned_session = std::get<MessageSigner>(MessageSigner::create(""));
  for (const MessageSigner* signer : {&unsigned_session, &keyed()}) {
    auto r = parse(parts, *signer);
    if (auto* e = std::get_if<GatewayError>(&r)) {
      if (e->message.empty()) broken("a refusal without a reason");
      continue;
    }
    const auto& m = std::get<JupyterMessage>(r);
    check_forwardable(m);
    for (auto protocol : {WsProtocol::legacy, WsProtocol::v1}) {
      ClientMessage cm{Channel::shell, m, {}};
      cm.message.identities.clear();
      check_reencodes(protocol, cm);
    }
  }
}

void check_http_error(const HttpError& e) {
  if (e.message.empty()) broken("an HTTP error without a message");
  if (e.status != 400 && e.status != 404 && e.status != 413) broken("an unexpected status");
  (void)error_json(e).dump();  // must not throw
}

void fuzz_start_request(std::string_view body) {
  auto r = parse_start_request(body);
  if (auto* e = std::get_if<HttpError>(&r)) return check_http_error(*e);
  const auto& request = std::get<StartRequest>(r);
  if (request.name && !valid_kernelspec_name(*request.name)) broken("an invalid name accepted");
  EnvPolicy policy;
  for (const auto& [name, value] : request.env) {
    if (policy.extra_names.size() < 4) policy.extra_names.insert(name);  // even if configured
  }
  const auto env = filter_env(request.env, policy);
  for (const auto& [name, value] : env.passed) {
    if (looks_secret(name)) broken("a credential-looking variable passed");
    if (name.rfind("KERNEL_", 0) != 0 && !policy.extra_names.count(name))
      broken("a variable outside the whitelist passed");
  }
  if (env.passed.size() + env.refused.size() + env.dropped != request.env.size())
    broken("the whitelist lost count");
  auto o = resource_overrides(env.passed);
  if (auto* e = std::get_if<HttpError>(&o)) return check_http_error(*e);
  const auto& res = std::get<ResourceOverrides>(o);
  if (res.nodes && (*res.nodes < 1 || *res.nodes > 1000000)) broken("nodes out of range");
  if (res.gpus && (*res.gpus < 0 || *res.gpus > 1024)) broken("gpus out of range");
  if (res.runtime && (res.runtime->count() < 1 || res.runtime->count() > 100LL * 365 * 86400))
    broken("runtime out of range");
}

void fuzz_kernelspec_target(std::string_view text) {
  const auto q = text.find('?');
  auto r = parse_kernelspec_target(text.substr(0, q),
                                   q == std::string_view::npos ? "" : text.substr(q + 1));
  if (auto* e = std::get_if<HttpError>(&r)) return check_http_error(*e);
  const auto& t = std::get<KernelspecTarget>(r);
  if (t.name && !valid_kernelspec_name(*t.name)) broken("an invalid kernelspec name accepted");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 6) {
    case 0:
      fuzz_frame(WsProtocol::legacy, FrameKind::text, rest);
      break;
    case 1:
      fuzz_frame(WsProtocol::legacy, FrameKind::binary, rest);
      break;
    case 2:
      fuzz_frame(WsProtocol::v1, FrameKind::binary, rest);
      break;
    case 3:
      fuzz_multipart(rest);
      break;
    case 4:
      fuzz_start_request(rest);
      break;
    default:
      fuzz_kernelspec_target(rest);
      break;
  }
  return 0;
}
