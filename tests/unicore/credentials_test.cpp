#include "unicore/credentials.hpp"

#include <gtest/gtest.h>

namespace kb::unicore {
namespace {

TEST(Credentials, AuthorizationHeaders) {
  EXPECT_EQ(Credentials::bearer("tok-alice").authorization(), "Bearer tok-alice");
  EXPECT_EQ(Credentials::basic("alice", "pw").authorization(), "Basic YWxpY2U6cHc=");
  EXPECT_EQ(Credentials::anonymous().authorization(), "");
}

TEST(Credentials, Base64Vectors) {
  EXPECT_EQ(base64_encode(""), "");
  EXPECT_EQ(base64_encode("f"), "Zg==");
  EXPECT_EQ(base64_encode("fo"), "Zm8=");
  EXPECT_EQ(base64_encode("foo"), "Zm9v");
  EXPECT_EQ(base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(base64_encode(std::string("\xff\x00\x10", 3)), "/wAQ");
}

TEST(Credentials, DescribeNeverContainsTheSecret) {
  EXPECT_EQ(Credentials::bearer("s3cret").describe().find("s3cret"), std::string::npos);
  auto basic = Credentials::basic("alice", "s3cret").describe();
  EXPECT_EQ(basic.find("s3cret"), std::string::npos);
  EXPECT_NE(basic.find("alice"), std::string::npos);
}

TEST(Credentials, HeaderInjectionIsRefused) {
  EXPECT_NE(Credentials::bearer("tok\r\nX-Evil: 1").validate(), "");
  EXPECT_EQ(Credentials::bearer("tok\r\nX-Evil: 1").validate().find("X-Evil"), std::string::npos);
  EXPECT_NE(Credentials::bearer("").validate(), "");
  EXPECT_NE(Credentials::basic("a:b", "pw").validate(), "");
  EXPECT_NE(Credentials::basic("alice", "p\nw").validate(), "");
  EXPECT_EQ(Credentials::basic("alice", "pw").validate(), "");
}

TEST(Preferences, ParseAndRender) {
  auto p = Preferences::parse("uid:alice,group:proj1,role:user,supgids:a+b");
  ASSERT_TRUE(p.ok()) << p.error().message;
  EXPECT_EQ(p->uid, "alice");
  EXPECT_EQ(p->group, "proj1");
  EXPECT_EQ(p->role, "user");
  EXPECT_EQ(p->supplementary_groups, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(p->header_value(), "uid:alice,group:proj1,role:user,supgids:a+b");
  auto pgid = Preferences::parse("pgid:proj2");
  ASSERT_TRUE(pgid.ok());
  EXPECT_EQ(pgid->header_value(), "group:proj2");
  EXPECT_TRUE(Preferences{}.empty());
}

TEST(Preferences, BadInputSaysWhat) {
  for (const char* bad : {"uid", "colour:blue", "uid:", "uid:a b", "uid:a\nb"}) {
    auto p = Preferences::parse(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.error().kind, ErrorKind::invalid_argument);
    EXPECT_NE(p.error().message.find("uid:alice"), std::string::npos);
  }
}

}  // namespace
}  // namespace kb::unicore
