#pragma once
// Secrets shared between the bridge and one agent (the per-kernel link secret) and the primitives
// the link's challenge-response uses. Pure functions; callable from any thread.
#include <array>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace kb::auth {

using Bytes = std::vector<std::uint8_t>;
using Digest = std::array<std::uint8_t, 32>;  // HMAC-SHA256 output

// Thrown only at start-up paths (reading or writing secret files); the message says what to do.
struct SecretError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Cryptographically random bytes (OpenSSL RAND_bytes). Throws SecretError if the RNG fails.
Bytes random_bytes(std::size_t n);

Digest hmac_sha256(std::span<const std::uint8_t> key, std::span<const std::uint8_t> data);

// Constant-time comparison (length is not secret).
bool equal_constant_time(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b);

std::string to_hex(std::span<const std::uint8_t> bytes);
// Returns false on odd length or a non-hex character.
bool from_hex(std::string_view hex, Bytes& out);

// A per-kernel link secret: 32 random bytes, stored as 64 hex characters plus a newline.
struct LinkSecret {
  static constexpr std::size_t kSize = 32;
  Bytes bytes;

  static LinkSecret generate();
  // Reads a secret file. Refuses (SecretError) a file that others can read or write (mode & 077),
  // that is missing, or whose content is not 64 hex characters; the message names the file.
  static LinkSecret read_file(const std::string& path);
  // Writes the secret to `path` with mode 0600 (created with O_EXCL via a temporary name, then
  // renamed), so no other user ever sees it even briefly.
  void write_file(const std::string& path) const;
  std::string hex() const { return to_hex(bytes); }
};

}  // namespace kb::auth
