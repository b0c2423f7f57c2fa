#pragma once
// Who is calling the control API: bearer tokens of TCP callers (the tokens file) and the peer's
// user on the Unix socket (SO_PEERCRED). ApiTokens is loaded at start-up (throws ConfigError) and
// then read-only, so lookups are safe from any thread; peer_uid/user_name_of_uid are free functions
// callable from any thread (user_name_of_uid may block on NSS: keep it off the event loop).
#include <sys/types.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kb::auth {

struct TokenIdentity {
  std::string user;
  bool admin = false;  // may act for any user (X-Kernel-Bridge-User) and see every kernel
};

// The tokens file: one "<token> <user> [admin]" per line; blank lines and '#' comments allowed.
// Tokens are at least 32 characters (e.g. `openssl rand -hex 32`); the file must be 0600 (or
// stricter). Only SHA-256 digests of the tokens are kept in memory.
class ApiTokens {
 public:
  static ApiTokens load(const std::string& path);  // ConfigError "file:line: …"
  static ApiTokens parse(std::string_view text, const std::string& file);

  // Compares the presented token with every entry in constant time (digests of equal length), so
  // neither the token's prefix nor which entry matched leaks through timing.
  std::optional<TokenIdentity> lookup(std::string_view token) const;
  std::size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::array<std::uint8_t, 32> digest;
    TokenIdentity identity;
  };
  std::vector<Entry> entries_;
};

// The uid of the process at the other end of a connected Unix socket, or nullopt.
std::optional<uid_t> peer_uid(int fd);
// The user name of a uid (getpwuid_r), or nullopt if the uid has no passwd entry.
std::optional<std::string> user_name_of_uid(uid_t uid);

}  // namespace kb::auth
