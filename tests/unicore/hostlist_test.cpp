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

}  // namespace
}  // namespace kb::unicore
