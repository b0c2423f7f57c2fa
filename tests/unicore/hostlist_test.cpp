#include "unicore/hostlist.hpp"

#include <gtest/gtest.h>

namespace kb::unicore {
namespace {

std::vector<std::string> expand(const std::string& s) {
  auto r = expand_hostlist(s);
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
  return r.ok() ? r.value() : std::vector<std::string>{};
}

using V = std::vector<std::string>;

TEST(Hostlist, PlainNamesAndLists) {
  EXPECT_EQ(expand("jrc0025"), V{"jrc0025"});
  EXPECT_EQ(expand("a,b,c"), (V{"a", "b", "c"}));
  EXPECT_EQ(expand(""), V{});
}

TEST(Hostlist, RangesKeepZeroPadding) {
  EXPECT_EQ(expand("jrc[0025-0026,0030]"), (V{"jrc0025", "jrc0026", "jrc0030"}));
  EXPECT_EQ(expand("n[8-11]"), (V{"n8", "n9", "n10", "n11"}));
  EXPECT_EQ(expand("n[08-10]"), (V{"n08", "n09", "n10"}));
}

TEST(Hostlist, SuffixAfterBracket) {
  EXPECT_EQ(expand("n[1-3]-ib"), (V{"n1-ib", "n2-ib", "n3-ib"}));
}

TEST(Hostlist, SeveralGroupsAndCartesianProduct) {
  EXPECT_EQ(expand("jrc[0025-0026],jwb[01,03],login"),
            (V{"jrc0025", "jrc0026", "jwb01", "jwb03", "login"}));
  EXPECT_EQ(expand("r[1-2]n[1-2]"), (V{"r1n1", "r1n2", "r2n1", "r2n2"}));
}

TEST(Hostlist, MalformedListsAreClearErrors) {
  for (const char* bad :
       {"n[1-3", "n1-3]", "n[a-b]", "n[3-1]", "n[]", "n[1-2],,m", "n[[1]]", "a b"}) {
    auto r = expand_hostlist(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().kind, ErrorKind::bad_reply);
    EXPECT_NE(r.error().message.find(bad), std::string::npos) << r.error().message;
  }
}

TEST(Hostlist, HugeExpansionIsRefusedNotAllocated) {
  auto r = expand_hostlist("n[0-999999999999]");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("more than"), std::string::npos);
  auto product = expand_hostlist("a[0-999]b[0-999]c[0-999]", 100000);
  ASSERT_FALSE(product.ok());
}

// unicore_replies_fuzz: the count of names was bounded, their length was not, so a NodeList of a
// 100 kB name before "[0-65535]" asked for 6.5 GB.
TEST(Hostlist, OverlongNamesAreRefusedNotAllocated) {
  auto r = expand_hostlist(std::string(100000, 'n') + "[0-65535]");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("longer than 255"), std::string::npos) << r.error().message;
  EXPECT_FALSE(expand_hostlist("n[0-9]" + std::string(254, 'x')).ok());
  EXPECT_FALSE(expand_hostlist(std::string(256, 'a')).ok());
  EXPECT_EQ(expand(std::string(255, 'a')), V{std::string(255, 'a')});
  EXPECT_EQ(expand(std::string(250, 'a') + "[0-9999]").back(), std::string(250, 'a') + "9999");
}

// unicore_replies_fuzz: "[0-65535]" followed by 249 "[0]" made every one of the 65536 names again
// for each group (seconds of the event loop); one-value groups are joined like literal text.
TEST(Hostlist, OneValueGroupsBetweenRanges) {
  EXPECT_EQ(expand("r[1-2][0]n[1-2][5]"), (V{"r10n15", "r10n25", "r20n15", "r20n25"}));
  std::string many = "a[0-65535]";
  for (int i = 0; i < 249; ++i) many += "[0]";
  auto r = expand_hostlist(many);
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_EQ(r->size(), 65536u);
  EXPECT_EQ(r->front(), "a0" + std::string(249, '0'));
  EXPECT_EQ(r->back(), "a65535" + std::string(249, '0'));
}

}  // namespace
}  // namespace kb::unicore
