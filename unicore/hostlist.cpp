#include "unicore/hostlist.hpp"

#include <algorithm>
#include <cctype>
#include <cstdint>

namespace kb::unicore {

namespace {

// A host name is at most 253 characters in DNS (Slurm's are far shorter). With `max_hosts` names
// this bounds the memory an expansion takes, not only the number of names.
constexpr std::size_t kMaxHostName = 255;

UnicoreError hostlist_error(std::string_view list, const std::string& why) {
  return UnicoreError{ErrorKind::bad_reply, 0,
                      "cannot expand host list '" + std::string(list) + "': " + why, "", ""};
}

UnicoreError name_too_long(std::string_view list) {
  return hostlist_error(
      list, "a host name is longer than " + std::to_string(kMaxHostName) + " characters");
}

bool all_digits(std::string_view s) {
  if (s.empty()) return false;
  for (unsigned char c : s) {
    if (!std::isdigit(c)) return false;
  }
  return true;
}

std::string pad(std::uint64_t value, std::size_t width) {
  std::string s = std::to_string(value);
  if (s.size() < width) s.insert(0, width - s.size(), '0');
  return s;
}

// One bracket group's content, e.g. "0025-0026,0030" -> {"0025","0026","0030"}.
Result<std::vector<std::string>> expand_ranges(std::string_view list, std::string_view body,
                                               std::size_t max_hosts) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos <= body.size()) {
    std::size_t comma = body.find(',', pos);
    std::string_view part =
        body.substr(pos, comma == std::string_view::npos ? body.npos : comma - pos);
    pos = comma == std::string_view::npos ? body.size() + 1 : comma + 1;
    auto dash = part.find('-');
    std::string_view lo = part.substr(0, dash);
    std::string_view hi = dash == std::string_view::npos ? lo : part.substr(dash + 1);
    if (!all_digits(lo) || !all_digits(hi) || lo.size() > 18 || hi.size() > 18) {
      return hostlist_error(list, "'" + std::string(part) + "' is not a number or a range a-b");
    }
    std::uint64_t a = std::stoull(std::string(lo));
    std::uint64_t b = std::stoull(std::string(hi));
    if (b < a) return hostlist_error(list, "range '" + std::string(part) + "' runs backwards");
    if (b - a >= max_hosts || out.size() + (b - a + 1) > max_hosts) {
      return hostlist_error(list, "more than " + std::to_string(max_hosts) + " hosts");
    }
    // Zero padding follows the lower bound as written ("0025" -> width 4), as Slurm prints it.
    std::size_t width = lo.size() > 1 && lo[0] == '0' ? lo.size() : 0;
    for (std::uint64_t v = a; v <= b; ++v) out.push_back(pad(v, width));
  }
  return out;
}

// One top-level item: literal text and bracket groups, expanded as a cartesian product. The count
// and the length of the names are known before any is made, and each name is made once: a hostile
// item (a 100 kB name before "[0-65535]", or "[0-65535]" followed by 250 "[0]") costs neither
// gigabytes nor seconds (both found by unicore_replies_fuzz).
Result<std::vector<std::string>> expand_item(std::string_view list, std::string_view item,
                                             std::size_t max_hosts) {
  // The parts in order, each a list of values; a literal is a part of one value, joined to the part
  // before it when that has one value too (so there are at most 2 * log2(max_hosts) + 1 parts).
  std::vector<std::vector<std::string>> parts;
  auto add_part = [&parts](std::vector<std::string> values) {
    if (values.size() == 1 && !parts.empty() && parts.back().size() == 1)
      parts.back().front() += values.front();
    else
      parts.push_back(std::move(values));
  };
  std::size_t count = 1;
  std::size_t longest = 0;  // the longest name the parts can make
  std::size_t pos = 0;
  while (pos < item.size()) {
    std::size_t open = item.find('[', pos);
    std::string_view literal =
        item.substr(pos, open == std::string_view::npos ? item.npos : open - pos);
    if (literal.find(']') != std::string_view::npos) return hostlist_error(list, "unbalanced ']'");
    longest += literal.size();
    if (longest > kMaxHostName) return name_too_long(list);
    if (!literal.empty()) add_part({std::string(literal)});
    if (open == std::string_view::npos) break;
    std::size_t close = item.find(']', open);
    if (close == std::string_view::npos) return hostlist_error(list, "unbalanced '['");
    std::string_view body = item.substr(open + 1, close - open - 1);
    if (body.find('[') != std::string_view::npos) return hostlist_error(list, "nested '['");
    auto values = expand_ranges(list, body, max_hosts);
    if (!values) return values.error();
    if (count * values->size() > max_hosts) {
      return hostlist_error(list, "more than " + std::to_string(max_hosts) + " hosts");
    }
    count *= values->size();
    std::size_t widest = 0;
    for (const auto& v : *values) widest = std::max(widest, v.size());
    longest += widest;
    if (longest > kMaxHostName) return name_too_long(list);
    add_part(std::move(values.value()));
    pos = close + 1;
  }
  // Every combination, the last group varying fastest ("r[1-2]n[1-2]": r1n1 r1n2 r2n1 r2n2); each
  // name keeps the start of the one before it up to the first part that changed.
  std::vector<std::string> names;
  names.reserve(count);
  std::vector<std::size_t> index(parts.size(), 0);
  std::vector<std::size_t> end(parts.size() + 1, 0);  // where each part ends in `name`
  std::string name;
  std::size_t changed = 0;
  for (std::size_t k = 0; k < count; ++k) {
    name.resize(end[changed]);
    for (std::size_t p = changed; p < parts.size(); ++p) {
      name += parts[p][index[p]];
      end[p + 1] = name.size();
    }
    names.push_back(name);
    std::size_t p = parts.size();
    while (p > 0) {
      --p;
      if (++index[p] < parts[p].size()) break;
      index[p] = 0;
    }
    changed = p;
  }
  return names;
}

}  // namespace

Result<std::vector<std::string>> expand_hostlist(std::string_view list, std::size_t max_hosts) {
  std::vector<std::string> hosts;
  int depth = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= list.size(); ++i) {
    char c = i < list.size() ? list[i] : ',';
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (depth < 0) return hostlist_error(list, "unbalanced ']'");
    if (c == ' ' || c == '\t') return hostlist_error(list, "contains white space");
    if (c != ',' || depth > 0) continue;
    std::string_view item = list.substr(start, i - start);
    start = i + 1;
    if (item.empty()) {
      if (i == list.size() && hosts.empty() && list.empty()) break;
      return hostlist_error(list, "empty host name");
    }
    auto names = expand_item(list, item, max_hosts);
    if (!names) return names.error();
    if (hosts.size() + names->size() > max_hosts) {
      return hostlist_error(list, "more than " + std::to_string(max_hosts) + " hosts");
    }
    for (auto& n : *names) {
      if (n.empty()) return hostlist_error(list, "empty host name");
      hosts.push_back(std::move(n));
    }
  }
  if (depth != 0) return hostlist_error(list, "unbalanced '['");
  return hosts;
}

}  // namespace kb::unicore
