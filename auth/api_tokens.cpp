#include "auth/api_tokens.hpp"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "auth/secret.hpp"
#include "common/config_error.hpp"
#include "common/files.hpp"

namespace kb::auth {
namespace {

std::array<std::uint8_t, 32> sha256(std::string_view text) {
  std::array<std::uint8_t, 32> digest{};
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest.data());
  return digest;
}

constexpr std::size_t kMinTokenLength = 32;
// Thousands of tokens fit; a larger file is a mistake (e.g. the wrong path).
constexpr std::size_t kMaxTokensFileBytes = 4 * 1024 * 1024;

}  // namespace

ApiTokens ApiTokens::load(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw ConfigError(path, 0,
                      std::string("cannot read the API tokens file: ") + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw ConfigError(path, 0, "the API tokens file is not a regular file");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw ConfigError(path, 0,
                      std::string("the API tokens file is accessible by group or others (mode ") +
                          mode + "); run: chmod 600 " + path);
  }
  std::string text;
  try {
    text = read_small_file(path, kMaxTokensFileBytes);
  } catch (const FileReadError& e) {
    throw ConfigError(path, 0, "cannot read the API tokens file: " + e.reason());
  }
  ApiTokens tokens = parse(text, path);
  OPENSSL_cleanse(text.data(), text.size());  // the text held every token in clear
  return tokens;
}

ApiTokens ApiTokens::parse(std::string_view text, const std::string& file) {
  ApiTokens tokens;
  int line_no = 0;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    std::vector<std::string_view> words;
    std::size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
      if (i >= line.size()) break;
      std::size_t start = i;
      while (i < line.size() && line[i] != ' ' && line[i] != '\t') ++i;
      words.push_back(line.substr(start, i - start));
    }
    if (words.empty() || words[0].front() == '#') {
      if (end == text.size()) break;
      continue;
    }
    // Messages never quote the token itself.
    if (words.size() < 2 || words.size() > 3) {
      throw ConfigError(file, line_no, "expected \"<token> <user>\" or \"<token> <user> admin\"");
    }
    if (words[0].size() < kMinTokenLength) {
      throw ConfigError(
          file, line_no,
          "token is shorter than 32 characters; generate one with: openssl rand -hex 32");
    }
    for (char c : words[0]) {
      if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) > 0x7e) {
        throw ConfigError(file, line_no,
                          "token contains a character that cannot go into an HTTP header");
      }
    }
    if (words.size() == 3 && words[2] != "admin") {
      throw ConfigError(file, line_no,
                        "unknown flag '" + std::string(words[2]) + "' (the only flag is 'admin')");
    }
    Entry entry{sha256(words[0]), TokenIdentity{std::string(words[1]), words.size() == 3}};
    for (const auto& other : tokens.entries_) {
      if (other.digest == entry.digest) {
        throw ConfigError(file, line_no,
                          "this token is listed twice; each token must name one user");
      }
    }
    tokens.entries_.push_back(std::move(entry));
    if (end == text.size()) break;
  }
  return tokens;
}

std::optional<TokenIdentity> ApiTokens::lookup(std::string_view token) const {
  const auto digest = sha256(token);
  const Entry* found = nullptr;
  for (const auto& entry : entries_) {
    // No early exit: every entry is compared.
    if (auth::equal_constant_time(digest, entry.digest)) found = &entry;
  }
  if (!found) return std::nullopt;
  return found->identity;
}

std::optional<uid_t> peer_uid(int fd) {
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) {
    return std::nullopt;
  }
  return cred.uid;
}

std::optional<std::string> user_name_of_uid(uid_t uid) {
  long size = ::sysconf(_SC_GETPW_R_SIZE_MAX);
  if (size <= 0) size = 16384;
  std::vector<char> buffer(static_cast<std::size_t>(size));
  struct passwd pw {};
  struct passwd* result = nullptr;
  for (;;) {
    int rc = ::getpwuid_r(uid, &pw, buffer.data(), buffer.size(), &result);
    if (rc == ERANGE && buffer.size() < (1u << 20)) {
      buffer.resize(buffer.size() * 2);
      continue;
    }
    if (rc != 0 || result == nullptr) return std::nullopt;
    return std::string(pw.pw_name);
  }
}

}  // namespace kb::auth
