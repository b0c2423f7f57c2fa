#include "unicore/credentials.hpp"

#include <cctype>

namespace kb::unicore {

namespace {

bool header_safe(std::string_view value) {
  for (unsigned char c : value) {
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

bool preference_value_ok(std::string_view value) {
  if (value.empty()) return false;
  for (unsigned char c : value) {
    if (c <= 0x20 || c == 0x7f || c == ',' || c == ':' || c == '+') return false;
  }
  return true;
}

UnicoreError bad_preferences(std::string why) {
  return UnicoreError{
      ErrorKind::invalid_argument, 0,
      "bad user preferences: " + why + " (expected e.g. uid:alice,group:proj1,role:user)", "", ""};
}

}  // namespace

bool Preferences::empty() const {
  return uid.empty() && group.empty() && role.empty() && supplementary_groups.empty();
}

std::string Preferences::header_value() const {
  std::string out;
  auto add = [&out](std::string_view key, std::string_view value) {
    if (value.empty()) return;
    if (!out.empty()) out += ',';
    out.append(key).append(":").append(value);
  };
  add("uid", uid);
  add("group", group);
  add("role", role);
  std::string sup;
  for (const auto& g : supplementary_groups) {
    if (!sup.empty()) sup += '+';
    sup += g;
  }
  add("supgids", sup);
  return out;
}

Result<Preferences> Preferences::parse(std::string_view text) {
  Preferences p;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    std::size_t comma = text.find(',', pos);
    std::string_view item =
        text.substr(pos, comma == std::string_view::npos ? text.npos : comma - pos);
    pos = comma == std::string_view::npos ? text.size() + 1 : comma + 1;
    if (item.empty()) continue;
    auto colon = item.find(':');
    if (colon == std::string_view::npos)
      return bad_preferences("'" + std::string(item) + "' has no ':'");
    std::string_view key = item.substr(0, colon);
    std::string_view value = item.substr(colon + 1);
    if (key == "supgids") {
      std::size_t s = 0;
      while (s <= value.size()) {
        std::size_t plus = value.find('+', s);
        std::string_view g =
            value.substr(s, plus == std::string_view::npos ? value.npos : plus - s);
        if (!preference_value_ok(g))
          return bad_preferences("bad supplementary group in '" + std::string(item) + "'");
        p.supplementary_groups.emplace_back(g);
        s = plus == std::string_view::npos ? value.size() + 1 : plus + 1;
      }
      continue;
    }
    if (!preference_value_ok(value))
      return bad_preferences("bad value in '" + std::string(item) + "'");
    if (key == "uid")
      p.uid = value;
    else if (key == "group" || key == "pgid")
      p.group = value;
    else if (key == "role")
      p.role = value;
    else
      return bad_preferences("unknown key '" + std::string(key) +
                             "' (known: uid, group, role, supgids)");
  }
  return p;
}

Credentials Credentials::bearer(std::string token, Preferences preferences) {
  Credentials c;
  c.kind = Kind::bearer;
  c.token = std::move(token);
  c.preferences = std::move(preferences);
  return c;
}

Credentials Credentials::basic(std::string user, std::string password, Preferences preferences) {
  Credentials c;
  c.kind = Kind::basic;
  c.user = std::move(user);
  c.password = std::move(password);
  c.preferences = std::move(preferences);
  return c;
}

Credentials Credentials::anonymous(Preferences preferences) {
  Credentials c;
  c.preferences = std::move(preferences);
  return c;
}

std::string Credentials::authorization() const {
  switch (kind) {
    case Kind::bearer:
      return "Bearer " + token;
    case Kind::basic:
      return "Basic " + base64_encode(user + ":" + password);
    case Kind::none:
      return {};
  }
  return {};
}

std::string Credentials::describe() const {
  switch (kind) {
    case Kind::bearer:
      return "a bearer token";
    case Kind::basic:
      return "user '" + user + "' (password)";
    case Kind::none:
      return "no credentials (anonymous)";
  }
  return "?";
}

std::string Credentials::validate() const {
  if (kind == Kind::bearer) {
    if (token.empty()) return "the bearer token is empty";
    if (!header_safe(token))
      return "the bearer token contains a control character (e.g. a newline)";
    for (unsigned char c : token) {
      if (c == ' ') return "the bearer token contains a space";
    }
  }
  if (kind == Kind::basic) {
    if (user.empty()) return "the user name is empty";
    if (user.find(':') != std::string::npos) return "the user name contains ':'";
    if (!header_safe(user) || !header_safe(password)) {
      return "the user name or password contains a control character (e.g. a newline)";
    }
  }
  return {};
}

std::string base64_encode(std::string_view bytes) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) |
                 (static_cast<unsigned char>(bytes[i + 1]) << 8) |
                 static_cast<unsigned char>(bytes[i + 2]);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  std::size_t rest = bytes.size() - i;
  if (rest == 1) {
    unsigned v = static_cast<unsigned char>(bytes[i]) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += "==";
  } else if (rest == 2) {
    unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) |
                 (static_cast<unsigned char>(bytes[i + 1]) << 8);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

}  // namespace kb::unicore
