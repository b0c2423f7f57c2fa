#include "gateway/jupyter_message.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <nlohmann/json.hpp>

#include <cstring>

#include "auth/secret.hpp"
#include "common/text.hpp"

namespace kb::gateway {

const char* to_string(Fault fault) {
  switch (fault) {
    case Fault::too_large:
      return "too_large";
    case Fault::malformed:
      return "malformed";
    case Fault::bad_json:
      return "bad_json";
    case Fault::bad_message:
      return "bad_message";
    case Fault::bad_channel:
      return "bad_channel";
    case Fault::missing_signature:
      return "missing_signature";
    case Fault::bad_signature:
      return "bad_signature";
    case Fault::duplicate_signature:
      return "duplicate_signature";
    case Fault::crypto:
      return "crypto";
  }
  return "unknown";
}

std::size_t JupyterMessage::size() const {
  std::size_t n = header.size() + parent_header.size() + metadata.size() + content.size();
  for (const auto& id : identities) n += id.size();
  for (const auto& b : buffers) n += b.size();
  return n;
}

namespace {

GatewayError error(Fault fault, std::string message) {
  return {fault, std::move(message)};
}

struct MacDeleter {
  void operator()(EVP_MAC* m) const { EVP_MAC_free(m); }
  void operator()(EVP_MAC_CTX* c) const { EVP_MAC_CTX_free(c); }
};

// HMAC-SHA256 over the four JSON parts in order, without copying them into one buffer.
std::optional<SignatureHistory::Digest> hmac_parts(const std::string& key,
                                                   const JupyterMessage& m) {
  static const std::unique_ptr<EVP_MAC, MacDeleter> mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  if (!mac) return std::nullopt;
  std::unique_ptr<EVP_MAC_CTX, MacDeleter> ctx(EVP_MAC_CTX_new(mac.get()));
  if (!ctx) return std::nullopt;
  char digest_name[] = "SHA256";
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest_name, 0),
      OSSL_PARAM_construct_end()};
  if (EVP_MAC_init(ctx.get(), reinterpret_cast<const unsigned char*>(key.data()), key.size(),
                   params) != 1)
    return std::nullopt;
  for (const std::string* part : {&m.header, &m.parent_header, &m.metadata, &m.content}) {
    if (EVP_MAC_update(ctx.get(), reinterpret_cast<const unsigned char*>(part->data()),
                       part->size()) != 1)
      return std::nullopt;
  }
  SignatureHistory::Digest out{};
  std::size_t len = 0;
  if (EVP_MAC_final(ctx.get(), out.data(), &len, out.size()) != 1 || len != out.size())
    return std::nullopt;
  return out;
}

GatewayError crypto_failed() {
  return error(Fault::crypto, "HMAC-SHA256 could not be computed (OpenSSL failed)");
}

}  // namespace

Result<MessageSigner> MessageSigner::create(std::string key, std::string_view scheme) {
  if (scheme != kSignatureScheme)
    return error(Fault::bad_signature, "signature scheme \"" + printable(scheme) +
                                           "\" is not supported; use \"hmac-sha256\"");
  return MessageSigner(std::move(key));
}

Result<std::string> MessageSigner::sign(const JupyterMessage& message) const {
  if (!signs()) return std::string();
  const auto digest = hmac_parts(key_, message);
  if (!digest) return crypto_failed();
  return auth::to_hex(*digest);
}

std::optional<GatewayError> MessageSigner::verify(const JupyterMessage& message,
                                                  std::string_view signature) const {
  if (!signs()) return std::nullopt;
  if (signature.empty()) return error(Fault::missing_signature, "the message is not signed");
  if (signature.size() != kSignatureHexSize)
    return error(Fault::bad_signature, "the signature has " + std::to_string(signature.size()) +
                                           " characters, not 64 hex digits");
  const auto digest = hmac_parts(key_, message);
  if (!digest) return crypto_failed();
  // jupyter_client compares the lowercase hexdigest as text; so do we, in constant time.
  const std::string expected = auth::to_hex(*digest);
  const auto* a = reinterpret_cast<const std::uint8_t*>(expected.data());
  const auto* b = reinterpret_cast<const std::uint8_t*>(signature.data());
  if (!auth::equal_constant_time({a, expected.size()}, {b, signature.size()}))
    return error(Fault::bad_signature, "the signature does not match the message");
  return std::nullopt;
}

std::size_t SignatureHistory::Hash::operator()(const Digest& d) const {
  std::size_t h = 0;
  std::memcpy(&h, d.data(), sizeof h);  // an HMAC output is uniformly distributed
  return h;
}

bool SignatureHistory::remember(const Digest& digest) {
  if (capacity_ == 0) return true;
  auto [it, inserted] = seen_.insert(digest);
  if (!inserted) return false;
  order_.push_back(&*it);
  if (order_.size() > capacity_) {
    seen_.erase(*order_.front());
    order_.pop_front();
  }
  return true;
}

Result<std::vector<std::string>> serialize(const JupyterMessage& message,
                                           const MessageSigner& signer) {
  auto signature = signer.sign(message);
  if (auto* e = std::get_if<GatewayError>(&signature)) return *e;
  std::vector<std::string> parts;
  parts.reserve(message.identities.size() + 6 + message.buffers.size());
  parts.insert(parts.end(), message.identities.begin(), message.identities.end());
  parts.emplace_back(kDelimiter);
  parts.push_back(std::move(std::get<std::string>(signature)));
  parts.push_back(message.header);
  parts.push_back(message.parent_header);
  parts.push_back(message.metadata);
  parts.push_back(message.content);
  parts.insert(parts.end(), message.buffers.begin(), message.buffers.end());
  return parts;
}

bool is_json_object(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size() &&
         (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r'))
    ++i;
  // A valid JSON text whose first token is '{' is an object.
  // nlohmann's lexer takes a NUL byte for the end of input; JSON text never holds a raw one.
  return i < text.size() && text[i] == '{' && text.find('\0') == std::string_view::npos &&
         json_depth_within(text, kMaxJsonDepth) && nlohmann::json::accept(text);
}

Result<HeaderFields> read_header(std::string_view header) {
  // The same test as every other part (no NUL, bounded depth, '{' first: the parser would skip a
  // byte order mark that a client's JSON.parse of the spliced frame would not).
  if (!is_json_object(header))
    return error(Fault::bad_json, "the header is not a JSON object (UTF-8, nesting at most " +
                                      std::to_string(kMaxJsonDepth) + ")");
  const auto j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return error(Fault::bad_json, "the header is not a JSON object");
  HeaderFields fields;
  for (auto [name, out] : {std::pair{"msg_id", &fields.msg_id}, {"msg_type", &fields.msg_type}}) {
    const auto it = j.find(name);
    if (it == j.end() || !it->is_string() || it->get_ref<const std::string&>().empty())
      return error(Fault::bad_message,
                   std::string("the header has no ") + name + " (a non-empty string)");
    *out = it->get<std::string>();
  }
  if (const auto it = j.find("session"); it != j.end()) {
    if (!it->is_string()) return error(Fault::bad_message, "the header's session is not a string");
    fields.session = it->get<std::string>();
  }
  return fields;
}

Result<JupyterMessage> parse(std::span<const std::string> parts, const MessageSigner& signer,
                             SignatureHistory* history, const MessageLimits& limits) {
  std::size_t total = 0;
  for (const auto& p : parts) {
    if (p.size() > limits.max_part)
      return error(Fault::too_large, "a part of " + std::to_string(p.size()) +
                                         " bytes is above the limit of " +
                                         std::to_string(limits.max_part));
    total += p.size();
  }
  if (total > limits.max_total)
    return error(Fault::too_large, "the message has " + std::to_string(total) +
                                       " bytes, above the limit of " +
                                       std::to_string(limits.max_total));
  std::size_t delimiter = 0;
  while (delimiter < parts.size() && parts[delimiter] != kDelimiter) ++delimiter;
  if (delimiter == parts.size())
    return error(Fault::malformed,
                 "no <IDS|MSG> delimiter in " + std::to_string(parts.size()) + " parts");
  if (delimiter > limits.max_identities)
    return error(Fault::malformed, std::to_string(delimiter) +
                                       " routing identities, above the limit of " +
                                       std::to_string(limits.max_identities));
  const std::size_t after = parts.size() - delimiter - 1;
  if (after < 5)
    return error(Fault::malformed,
                 "after the delimiter " + std::to_string(after) +
                     " parts, but a message needs a signature and four JSON parts");
  if (after - 5 > limits.max_buffers)
    return error(Fault::too_large, std::to_string(after - 5) + " buffers, above the limit of " +
                                       std::to_string(limits.max_buffers));
  JupyterMessage m;
  for (std::size_t i = 0; i < delimiter; ++i) {
    if (parts[i].size() > limits.max_identity)
      return error(Fault::malformed, "a routing identity of " + std::to_string(parts[i].size()) +
                                         " bytes (at most " + std::to_string(limits.max_identity) +
                                         ")");
    m.identities.push_back(parts[i]);
  }
  const std::string& signature = parts[delimiter + 1];
  m.header = parts[delimiter + 2];
  m.parent_header = parts[delimiter + 3];
  m.metadata = parts[delimiter + 4];
  m.content = parts[delimiter + 5];
  m.buffers.assign(parts.begin() + static_cast<std::ptrdiff_t>(delimiter + 6), parts.end());

  if (auto e = signer.verify(m, signature)) return *e;
  if (history && signer.signs()) {
    auth::Bytes digest;
    SignatureHistory::Digest d{};
    // verify() passed, so the signature is 64 hex digits.
    if (!auth::from_hex(signature, digest) || digest.size() != d.size())
      return error(Fault::bad_signature, "the signature is not 64 hex digits");
    std::memcpy(d.data(), digest.data(), d.size());
    if (!history->remember(d))
      return error(Fault::duplicate_signature, "the signature was seen before (a replay)");
  }
  if (auto h = read_header(m.header); auto* e = std::get_if<GatewayError>(&h)) return *e;
  for (auto [name, part] : {std::pair{"parent_header", &m.parent_header},
                            {"metadata", &m.metadata},
                            {"content", &m.content}}) {
    if (!is_json_object(*part))
      return error(Fault::bad_json, std::string("the ") + name + " is not a JSON object");
  }
  return m;
}

}  // namespace kb::gateway
