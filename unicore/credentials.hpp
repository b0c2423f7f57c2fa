#pragma once
// Who a UNICORE request acts for: a bearer token (the normal case: the user's OIDC access token),
// Basic user/password (test sites), or nobody (anonymous), plus the user's preferences (uid, group
// = HPC project, role). Plain values; usable from any thread. Secrets are never logged: describe()
// omits them.
#include <string>
#include <string_view>
#include <vector>

#include "unicore/result.hpp"

namespace kb::unicore {

// X-UNICORE-User-Preferences: which of the user's identities a request uses.
struct Preferences {
  std::string uid;
  std::string group;  // primary group; on HPC sites the project/budget
  std::string role;
  std::vector<std::string> supplementary_groups;

  bool empty() const;
  // "uid:alice,group:proj1,role:user[,supgids:a+b]" — keys as the UNICORE server reads them.
  std::string header_value() const;
  // Parses "uid:x,group:y,role:z,supgids:a+b" (also "pgid" for group). Values must not contain
  // ',', ':', '+' or control characters.
  static Result<Preferences> parse(std::string_view text);
};

struct Credentials {
  enum class Kind { none, bearer, basic };
  Kind kind = Kind::none;
  std::string token;     // bearer
  std::string user;      // basic
  std::string password;  // basic
  Preferences preferences;

  static Credentials bearer(std::string token, Preferences preferences = {});
  static Credentials basic(std::string user, std::string password, Preferences preferences = {});
  static Credentials anonymous(Preferences preferences = {});

  // The Authorization header value ("Bearer …" / "Basic base64(user:password)"), empty for none.
  std::string authorization() const;
  // For logs and error messages: the scheme and the user, never a secret.
  std::string describe() const;
  // Empty when the values can go into HTTP headers; otherwise says what is wrong (e.g. a newline in
  // a token read from a file), without quoting the secret.
  std::string validate() const;
};

std::string base64_encode(std::string_view bytes);

}  // namespace kb::unicore
