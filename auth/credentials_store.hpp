#pragma once
// CredentialsStore: each user's UNICORE access token, pushed by the hub (PUT
// /v1/users/{user}/credentials) and read by the lifecycle when it talks to UNICORE for that user.
// Memory only: never logged, never written anywhere; a token's bytes are wiped when it is replaced,
// erased or the store is destroyed. Called on the io_context thread only (not thread-safe).
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

namespace kb::auth {

class CredentialsStore {
 public:
  using Clock = std::chrono::system_clock;
  enum class Status { missing, expired, valid };

  // What may be shown about a stored token: never the token itself.
  struct Info {
    Status status = Status::missing;
    std::optional<Clock::time_point> expires_at;
    Clock::time_point updated_at{};
  };

  CredentialsStore() = default;
  ~CredentialsStore();
  CredentialsStore(const CredentialsStore&) = delete;
  CredentialsStore& operator=(const CredentialsStore&) = delete;

  // Replaces the user's token (the old one is wiped). `expires_at` empty = unknown expiry.
  void set(const std::string& user, std::string token, std::optional<Clock::time_point> expires_at,
           Clock::time_point now = Clock::now());
  // The user's token if present and not expired at `now`.
  std::optional<std::string> token(const std::string& user,
                                   Clock::time_point now = Clock::now()) const;
  Info info(const std::string& user, Clock::time_point now = Clock::now()) const;
  void erase(const std::string& user);
  std::size_t size() const { return entries_.size(); }

  // Told (with the user's name, never the token) after every set(), e.g. so the lifecycle retries
  // a kernel that waits for credentials. Returns a handle for unsubscribe().
  std::uint64_t subscribe(std::function<void(const std::string& user)> listener);
  void unsubscribe(std::uint64_t handle);

 private:
  struct Entry {
    std::string token;
    std::optional<Clock::time_point> expires_at;
    Clock::time_point updated_at;
  };
  static void wipe(std::string& secret);

  std::map<std::string, Entry> entries_;
  std::map<std::uint64_t, std::function<void(const std::string&)>> listeners_;
  std::uint64_t last_listener_ = 0;
};

}  // namespace kb::auth
