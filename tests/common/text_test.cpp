// Tests common/text.*: what a log line or error message quotes of a request is valid, printable
// UTF-8 of bounded length, whatever bytes the request held.
#include "common/text.hpp"

#include <gtest/gtest.h>

namespace kb {
namespace {

TEST(Printable, KeepsValidTextAndQuotesTheRest) {
  EXPECT_EQ(printable("k3-alice"), "k3-alice");
  EXPECT_EQ(printable("gr\xC3\xBC\xC3\x9F"
                      "e"),
            "gr\xC3\xBC\xC3\x9F"
            "e");  // "grüße"
  EXPECT_EQ(printable("\xff\xfe"), "\\xff\\xfe");
  EXPECT_EQ(printable("\xc3("), "\\xc3(");  // a lead byte without its continuation
  EXPECT_EQ(printable("a\nb\tc\x7f"), "a\\x0ab\\x09c\\x7f");
  EXPECT_EQ(printable("back\\slash"), "back\\x5cslash");    // so that \xNN cannot be forged
  EXPECT_EQ(printable("\xe0\x80\x80"), "\\xe0\\x80\\x80");  // overlong
  EXPECT_EQ(printable("\xed\xa0\x80"), "\\xed\\xa0\\x80");  // a surrogate
  EXPECT_EQ(printable("\xf4\x90\x80\x80"), "\\xf4\\x90\\x80\\x80");  // above U+10FFFF
}

TEST(Printable, CutsLongTextSayingHowLongItWas) {
  const std::string out = printable(std::string(10000, 'k'), 96);
  EXPECT_EQ(out, std::string(96, 'k') + "\xE2\x80\xA6(10000 bytes)");
  EXPECT_TRUE(valid_utf8(out));
  // A multi-byte character is never split.
  const std::string umlauts = printable(std::string(200, 'x').replace(95, 2, "\xC3\xBC"), 96);
  EXPECT_TRUE(valid_utf8(umlauts));
}

TEST(ValidUtf8, AcceptsUtf8Only) {
  EXPECT_TRUE(valid_utf8(""));
  EXPECT_TRUE(valid_utf8("plain"));
  EXPECT_TRUE(valid_utf8("\xF0\x9F\x98\x80"));  // U+1F600
  EXPECT_FALSE(valid_utf8("\xff"));
  EXPECT_FALSE(valid_utf8("\xF0\x9F\x98"));  // cut short
  EXPECT_FALSE(valid_utf8("\xC0\xAF"));      // overlong '/'
}

}  // namespace
}  // namespace kb
