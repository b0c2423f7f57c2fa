#include "auth/credentials_store.hpp"

#include <openssl/crypto.h>

namespace kb::auth {

void CredentialsStore::wipe(std::string& secret) {
  // OPENSSL_cleanse is not optimised away, unlike a plain memset before destruction.
  if (!secret.empty()) OPENSSL_cleanse(secret.data(), secret.size());
  secret.clear();
  secret.shrink_to_fit();
}

CredentialsStore::~CredentialsStore() {
  for (auto& [user, entry] : entries_) wipe(entry.token);
}

void CredentialsStore::set(const std::string& user, std::string token,
                           std::optional<Clock::time_point> expires_at, Clock::time_point now) {
  auto it = entries_.find(user);
  if (it != entries_.end()) wipe(it->second.token);
  Entry& entry = entries_[user];
  entry.token = std::move(token);
  wipe(token);  // the moved-from argument may still hold a copy (small-string buffer)
  entry.expires_at = expires_at;
  entry.updated_at = now;

  std::vector<std::uint64_t> handles;
  for (const auto& l : listeners_) handles.push_back(l.first);
  for (auto handle : handles) {
    auto l = listeners_.find(handle);
    if (l == listeners_.end()) continue;
    auto listener = l->second;
    listener(user);
  }
}

std::optional<std::string> CredentialsStore::token(const std::string& user,
                                                   Clock::time_point now) const {
  auto it = entries_.find(user);
  if (it == entries_.end()) return std::nullopt;
  if (it->second.expires_at && *it->second.expires_at <= now) return std::nullopt;
  return it->second.token;
}

CredentialsStore::Info CredentialsStore::info(const std::string& user,
                                              Clock::time_point now) const {
  Info info;
  auto it = entries_.find(user);
  if (it == entries_.end()) return info;
  info.expires_at = it->second.expires_at;
  info.updated_at = it->second.updated_at;
  info.status =
      (it->second.expires_at && *it->second.expires_at <= now) ? Status::expired : Status::valid;
  return info;
}

void CredentialsStore::erase(const std::string& user) {
  auto it = entries_.find(user);
  if (it == entries_.end()) return;
  wipe(it->second.token);
  entries_.erase(it);
}

std::uint64_t CredentialsStore::subscribe(std::function<void(const std::string&)> listener) {
  const auto handle = ++last_listener_;
  listeners_.emplace(handle, std::move(listener));
  return handle;
}

void CredentialsStore::unsubscribe(std::uint64_t handle) {
  listeners_.erase(handle);
}

}  // namespace kb::auth
