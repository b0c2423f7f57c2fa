// Tests auth/api_tokens.* (the control API's tokens file).
#include "auth/api_tokens.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/config_error.hpp"
#include "tests/common/temp_dir.hpp"

namespace kb::auth {
namespace {

using ::testing::HasSubstr;

const std::string kToken = "0123456789abcdef0123456789abcdef";

TEST(ApiTokens, ParsesUsersAndAdminFlag) {
  ApiTokens tokens = ApiTokens::parse(
      "# comment\n\n" + kToken + " alice\n" + kToken + "X hub admin\r\n", "tokens");
  EXPECT_EQ(tokens.size(), 2u);
  auto alice = tokens.lookup(kToken);
  ASSERT_TRUE(alice);
  EXPECT_EQ(alice->user, "alice");
  EXPECT_FALSE(alice->admin);
  auto hub = tokens.lookup(kToken + "X");
  ASSERT_TRUE(hub);
  EXPECT_TRUE(hub->admin);
  EXPECT_FALSE(tokens.lookup(kToken.substr(1)));
  EXPECT_FALSE(tokens.lookup(""));
}

std::string tokens_error(const std::string& text) {
  try {
    ApiTokens::parse(text, "/etc/kb/api-tokens");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ApiTokens, ErrorsNameFileAndLineButNeverTheToken) {
  EXPECT_EQ(tokens_error("short alice\n"),
            "/etc/kb/api-tokens:1: token is shorter than 32 characters; generate one with: openssl "
            "rand -hex 32");
  EXPECT_EQ(tokens_error("\n" + kToken + "\n"),
            "/etc/kb/api-tokens:2: expected \"<token> <user>\" or \"<token> <user> admin\"");
  EXPECT_EQ(tokens_error(kToken + " a root\n"),
            "/etc/kb/api-tokens:1: unknown flag 'root' (the only flag is 'admin')");
  const std::string dup = tokens_error(kToken + " a\n" + kToken + " b\n");
  EXPECT_EQ(dup, "/etc/kb/api-tokens:2: this token is listed twice; each token must name one user");
  EXPECT_THAT(dup, ::testing::Not(HasSubstr(kToken)));
}

TEST(ApiTokens, FileMustBePrivate) {
  kb::test::TempDir dir;
  const std::string path = dir.write("api-tokens", kToken + " alice\n", 0640);
  try {
    ApiTokens::load(path);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(
        std::string(e.what()),
        path +
            ": the API tokens file is accessible by group or others (mode 0640); run: chmod 600 " +
            path);
  }
  ::chmod(path.c_str(), 0600);
  EXPECT_EQ(ApiTokens::load(path).size(), 1u);
}

}  // namespace
}  // namespace kb::auth
