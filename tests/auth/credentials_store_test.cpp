// Tests auth/credentials_store.* (users' UNICORE tokens in memory).
#include "auth/credentials_store.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kb::auth {
namespace {

TEST(CredentialsStore, StoresExpiresReplacesAndNotifies) {
  CredentialsStore store;
  const auto now = CredentialsStore::Clock::now();
  std::vector<std::string> notified;
  auto handle = store.subscribe([&](const std::string& user) { notified.push_back(user); });
  EXPECT_EQ(store.info("alice").status, CredentialsStore::Status::missing);
  store.set("alice", "token-1", now + std::chrono::minutes(5), now);
  EXPECT_EQ(store.token("alice", now), "token-1");
  EXPECT_EQ(store.info("alice", now).status, CredentialsStore::Status::valid);
  EXPECT_FALSE(store.token("alice", now + std::chrono::minutes(6)));
  EXPECT_EQ(store.info("alice", now + std::chrono::minutes(6)).status,
            CredentialsStore::Status::expired);
  store.set("alice", "token-2", std::nullopt, now);
  EXPECT_EQ(store.token("alice", now + std::chrono::hours(100)), "token-2");
  EXPECT_FALSE(store.token("bob"));
  store.unsubscribe(handle);
  store.set("bob", "token-3", std::nullopt);
  EXPECT_EQ(notified, (std::vector<std::string>{"alice", "alice"}));
  store.erase("alice");
  EXPECT_FALSE(store.token("alice"));
  EXPECT_EQ(store.size(), 1u);
}

}  // namespace
}  // namespace kb::auth
