#pragma once
// ConnectionLimits: who may hold how many of the control API's connections, so that a flood of
// idle connections — from TCP clients without a token, or from one local user — cannot lock out
// the kernelspec wrappers, the hub or other users. Each listener has its own budget; within it,
// each user (uid on the Unix socket, token user on TCP) has a cap, and the last slots of a
// listener are kept for admin users (the hub). TCP connections count as unauthenticated until
// their first request with a valid token; those have a small budget of their own, and when it is
// full the oldest one is dropped to make room (a real client sends its request at once; an
// attacker's idle connection is the oldest). Pure bookkeeping, no I/O: the control API calls it
// on its io_context thread.
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace kb::bridge {

class ConnectionLimits {
 public:
  struct Settings {
    std::size_t max_per_listener = 1024;   // per listener (Unix socket, TCP)
    std::size_t max_per_user = 64;         // per uid / token user; admins are exempt
    std::size_t admin_reserve = 64;        // of max_per_listener, only admins may take these
    std::size_t max_unauthenticated = 64;  // TCP connections before their first valid token
  };
  using Id = std::uint64_t;

  explicit ConnectionLimits(Settings settings) : settings_(settings) {}

  // A new Unix connection from `uid`. Empty: admitted (call release later). Otherwise the
  // sentence to send back before closing it.
  std::optional<std::string> admit_unix(Id id, uid_t uid, bool admin);

  // A new TCP connection, not yet authenticated: always admitted; returns the connections to
  // drop now (the oldest unauthenticated ones beyond max_unauthenticated) and, when the
  // listener is full, this one itself.
  std::vector<Id> admit_tcp(Id id);

  // The first request on TCP connection `id` carried a valid token of `user`. Empty: it now
  // counts as that user's; otherwise the sentence to answer with (503) before closing.
  std::optional<std::string> authenticated_tcp(Id id, const std::string& user, bool admin);
  bool is_authenticated(Id id) const;

  // The connection closed (any kind, any state). Unknown ids are ignored.
  void release(Id id);

  std::size_t unix_open() const { return unix_open_; }
  std::size_t tcp_open() const { return tcp_authenticated_ + pending_.size(); }
  std::size_t tcp_unauthenticated() const { return pending_.size(); }
  const Settings& settings() const { return settings_; }

 private:
  struct Held {
    enum class Kind { unix_socket, tcp_pending, tcp_user } kind;
    std::string user;  // uid as text, or the token user
    bool admin = false;
    std::list<Id>::iterator pending;  // kind == tcp_pending
  };
  std::optional<std::string> check(std::size_t open, std::map<std::string, std::size_t>& per_user,
                                   const std::string& user, const std::string& who, bool admin,
                                   const char* listener) const;

  Settings settings_;
  std::map<Id, Held> held_;
  std::map<std::string, std::size_t> unix_per_user_, tcp_per_user_;
  std::list<Id> pending_;  // unauthenticated TCP connections, oldest first
  std::size_t unix_open_ = 0, tcp_authenticated_ = 0;
};

}  // namespace kb::bridge
