#include "auth/secret.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

namespace kb::auth {
namespace {

std::string temp_path(const char* name) {
  return (std::filesystem::temp_directory_path() /
          (std::string("kb-secret-") + std::to_string(::getpid()) + "-" + name))
      .string();
}

TEST(LinkSecretTest, RoundTripsThroughA0600File) {
  auto path = temp_path("roundtrip");
  auto secret = LinkSecret::generate();
  ASSERT_EQ(secret.bytes.size(), LinkSecret::kSize);
  secret.write_file(path);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(LinkSecret::read_file(path).bytes, secret.bytes);
  std::remove(path.c_str());
}

TEST(LinkSecretTest, RefusesAFileOthersCanRead) {
  auto path = temp_path("open");
  LinkSecret::generate().write_file(path);
  ::chmod(path.c_str(), 0644);
  try {
    LinkSecret::read_file(path);
    FAIL() << "a world-readable secret was accepted";
  } catch (const SecretError& e) {
    EXPECT_NE(std::string(e.what()).find("chmod 600"), std::string::npos) << e.what();
  }
  std::remove(path.c_str());
}

TEST(LinkSecretTest, RefusesMalformedContent) {
  auto path = temp_path("bad");
  {
    std::ofstream out(path);
    out << "not-hex-at-all\n";
  }
  ::chmod(path.c_str(), 0600);
  EXPECT_THROW(LinkSecret::read_file(path), SecretError);
  std::remove(path.c_str());
  EXPECT_THROW(LinkSecret::read_file(path), SecretError);  // missing file
}

TEST(HmacTest, MatchesRfc4231TestCase2) {
  std::string key = "Jefe";
  std::string data = "what do ya want for nothing?";
  auto d = hmac_sha256({reinterpret_cast<const std::uint8_t*>(key.data()), key.size()},
                       {reinterpret_cast<const std::uint8_t*>(data.data()), data.size()});
  EXPECT_EQ(to_hex(d), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(HexTest, RejectsOddLengthAndBadDigits) {
  Bytes out;
  EXPECT_FALSE(from_hex("abc", out));
  EXPECT_FALSE(from_hex("zz", out));
  ASSERT_TRUE(from_hex("00ff10", out));
  EXPECT_EQ(out, (Bytes{0x00, 0xff, 0x10}));
}

TEST(ConstantTimeTest, ComparesContentAndLength) {
  Bytes a{1, 2, 3}, b{1, 2, 3}, c{1, 2, 4}, d{1, 2};
  EXPECT_TRUE(equal_constant_time(a, b));
  EXPECT_FALSE(equal_constant_time(a, c));
  EXPECT_FALSE(equal_constant_time(a, d));
}

}  // namespace
}  // namespace kb::auth
