// Tests bridge/api_forms.*: the RFC 3339 time stamps of the control API (the request-body readers
// are tested through the API in control_api_test.cpp).
#include "bridge/api_forms.hpp"

#include <gtest/gtest.h>

namespace kb::bridge {
namespace {

TEST(ApiForms, TimesInRfc3339Forms) {
  const auto z = parse_time_utc("2026-11-26T16:00:00Z");
  ASSERT_TRUE(z);
  EXPECT_EQ(format_time_utc(*z), "2026-11-26T16:00:00.000Z");
  EXPECT_EQ(parse_time_utc("2026-11-26T17:30:00.25+01:30"), *z + std::chrono::milliseconds(250));
  EXPECT_EQ(parse_time_utc("2026-11-26T15:00:00-01:00"), z);
  EXPECT_TRUE(parse_time_utc("2028-02-29T00:00:00z"));   // a leap day
  EXPECT_TRUE(parse_time_utc("2026-12-31T23:59:60Z"));   // a leap second
  EXPECT_FALSE(parse_time_utc("2026-11-26 16:00:00Z"));  // no T
  EXPECT_FALSE(parse_time_utc("2200-01-01T00:00:00Z"));  // past what Clock holds
}

// api_forms_fuzz: sscanf's %2d took a sign or one digit where the form has two digits, so these
// were times (the first as 05:03 east of UTC, the second as 23:00 the day before).
TEST(ApiForms, TimesWithFieldsThatAreNotTwoDigitsAreRefused) {
  for (const char* bad :
       {"2030-02-28T23:59:59.5+05:3*", "2030-01-01T-1:00:00Z", "2030-01-01T00:-1:00Z",
        "2030-01-01T00:00:-1Z", "2030-01-01T00:00:00+-1:00", "2030-01-01T00:00:00+1:000",
        "2030-01-01T00:00:00+24:00", "2030-01-01T00:00:00+00:60", "2030-+1-01T00:00:00Z"}) {
    EXPECT_FALSE(parse_time_utc(bad)) << bad;
  }
}

// The same gap: days the month does not have were moved into the next month by timegm.
TEST(ApiForms, DaysTheMonthDoesNotHaveAreRefused) {
  for (const char* bad : {"2030-02-31T00:00:00Z", "2030-02-29T00:00:00Z", "2100-02-29T00:00:00Z",
                          "2030-04-31T00:00:00Z"}) {
    EXPECT_FALSE(parse_time_utc(bad)) << bad;
  }
  EXPECT_TRUE(parse_time_utc("2000-02-29T00:00:00Z"));
}

}  // namespace
}  // namespace kb::bridge
