#include "auth/secret.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/files.hpp"

namespace kb::auth {

Bytes random_bytes(std::size_t n) {
  Bytes out(n);
  if (n > 0 && RAND_bytes(out.data(), static_cast<int>(n)) != 1) {
    throw SecretError("the system's random number generator failed (OpenSSL RAND_bytes)");
  }
  return out;
}

Digest hmac_sha256(std::span<const std::uint8_t> key, std::span<const std::uint8_t> data) {
  Digest out{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data.data(), data.size(), out.data(),
       &len);
  return out;
}

bool equal_constant_time(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) {
  if (a.size() != b.size()) return false;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string to_hex(std::span<const std::uint8_t> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (auto b : bytes) {
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 0xf]);
  }
  return out;
}

namespace {
int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace

bool from_hex(std::string_view hex, Bytes& out) {
  if (hex.size() % 2 != 0) return false;
  Bytes result;
  result.reserve(hex.size() / 2);
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    int hi = hex_value(hex[i]);
    int lo = hex_value(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    result.push_back(static_cast<std::uint8_t>(hi << 4 | lo));
  }
  out = std::move(result);
  return true;
}

LinkSecret LinkSecret::generate() {
  return LinkSecret{random_bytes(kSize)};
}

LinkSecret LinkSecret::read_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw SecretError("cannot read link secret file " + path + ": " + std::strerror(errno));
  }
  if ((st.st_mode & 077) != 0) {
    throw SecretError("link secret file " + path +
                      " is readable or writable by other users; run: chmod 600 " + path);
  }
  std::string text;
  try {
    text = read_small_file(path, 4096);  // 64 hex characters and a newline
  } catch (const FileReadError& e) {
    throw SecretError("cannot read link secret file " + path + ": " + e.reason());
  }
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) {
    text.pop_back();
  }
  LinkSecret secret;
  if (text.size() != kSize * 2 || !from_hex(text, secret.bytes)) {
    throw SecretError("link secret file " + path + " must hold exactly " +
                      std::to_string(kSize * 2) + " hex characters");
  }
  return secret;
}

void LinkSecret::write_file(const std::string& path) const {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw SecretError("cannot create " + tmp + ": " + std::strerror(errno));
  }
  std::string text = hex() + "\n";
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ok = (::fsync(fd) == 0) && ok;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw SecretError("cannot write link secret file " + path + ": " + std::strerror(err));
  }
}

}  // namespace kb::auth
