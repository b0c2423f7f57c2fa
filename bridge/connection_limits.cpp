#include "bridge/connection_limits.hpp"

namespace kb::bridge {

std::optional<std::string> ConnectionLimits::check(std::size_t open,
                                                   std::map<std::string, std::size_t>& per_user,
                                                   const std::string& user, const std::string& who,
                                                   bool admin, const char* listener) const {
  const std::size_t for_everyone = settings_.max_per_listener > settings_.admin_reserve
                                       ? settings_.max_per_listener - settings_.admin_reserve
                                       : 0;
  if (open >= settings_.max_per_listener || (!admin && open >= for_everyone)) {
    return std::string("the control API's ") + listener + " has " + std::to_string(open) +
           " connections open, its limit (api.max_connections = " +
           std::to_string(settings_.max_per_listener) + ", the last " +
           std::to_string(settings_.admin_reserve) + " kept for admins); try again later";
  }
  if (!admin && per_user[user] >= settings_.max_per_user) {
    return who + " has " + std::to_string(per_user[user]) +
           " connections to the control API open already, the limit per user "
           "(api.max_connections_per_user); close idle ones";
  }
  return std::nullopt;
}

std::optional<std::string> ConnectionLimits::admit_unix(Id id, uid_t uid, bool admin) {
  const std::string user = std::to_string(uid);
  if (auto refusal = check(unix_open_, unix_per_user_, user, "uid " + user, admin, "Unix socket"))
    return refusal;
  ++unix_open_;
  ++unix_per_user_[user];
  held_[id] = Held{Held::Kind::unix_socket, user, admin, {}};
  return std::nullopt;
}

std::vector<ConnectionLimits::Id> ConnectionLimits::admit_tcp(Id id) {
  std::vector<Id> drop;
  if (tcp_authenticated_ + pending_.size() >= settings_.max_per_listener && pending_.size() == 0) {
    drop.push_back(id);  // full of authenticated connections: this one cannot be let in
    return drop;
  }
  pending_.push_back(id);
  held_[id] = Held{Held::Kind::tcp_pending, {}, false, std::prev(pending_.end())};
  while (pending_.size() > settings_.max_unauthenticated ||
         (tcp_authenticated_ + pending_.size() > settings_.max_per_listener && !pending_.empty())) {
    drop.push_back(pending_.front());
    release(pending_.front());
  }
  return drop;
}

std::optional<std::string> ConnectionLimits::authenticated_tcp(Id id, const std::string& user,
                                                               bool admin) {
  auto it = held_.find(id);
  if (it == held_.end() || it->second.kind != Held::Kind::tcp_pending) return std::nullopt;
  // This connection is counted already (as pending); it does not count against itself.
  if (auto refusal = check(tcp_authenticated_, tcp_per_user_, user, "the token user " + user, admin,
                           "TCP listener")) {
    return refusal;
  }
  pending_.erase(it->second.pending);
  it->second = Held{Held::Kind::tcp_user, user, admin, {}};
  ++tcp_authenticated_;
  ++tcp_per_user_[user];
  return std::nullopt;
}

bool ConnectionLimits::is_authenticated(Id id) const {
  auto it = held_.find(id);
  return it != held_.end() && it->second.kind == Held::Kind::tcp_user;
}

void ConnectionLimits::release(Id id) {
  auto it = held_.find(id);
  if (it == held_.end()) return;
  Held& h = it->second;
  auto forget = [](std::map<std::string, std::size_t>& per_user, const std::string& user) {
    if (auto u = per_user.find(user); u != per_user.end() && --u->second == 0) per_user.erase(u);
  };
  switch (h.kind) {
    case Held::Kind::unix_socket:
      --unix_open_;
      forget(unix_per_user_, h.user);
      break;
    case Held::Kind::tcp_pending:
      pending_.erase(h.pending);
      break;
    case Held::Kind::tcp_user:
      --tcp_authenticated_;
      forget(tcp_per_user_, h.user);
      break;
  }
  held_.erase(it);
}

}  // namespace kb::bridge
