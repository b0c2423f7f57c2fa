#pragma once
// Quoting text that came from outside (URLs, headers, ids, file paths) before it goes into a log
// line, an error message or a JSON string: valid printable UTF-8 passes unchanged, anything else
// becomes \xNN, and long text is cut, so one request can neither break a JSON serializer nor fill
// the log. Pure functions, callable from any thread.
#include <cstddef>
#include <string>
#include <string_view>

namespace kb {

// `text` as printable, valid UTF-8 of at most about `max_bytes` bytes: control characters, DEL,
// backslashes and bytes that are not part of a valid UTF-8 sequence are written as \xNN; if it is
// cut, "…(N bytes)" ends it with N the original length.
std::string printable(std::string_view text, std::size_t max_bytes = 96);

// Whether `text` is valid UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
bool valid_utf8(std::string_view text);
// Whether JSON `text` nests arrays and objects no deeper than `max_depth` (brackets outside
// strings; not a validator). Checked before parsing: printing or freeing a parsed value recurses,
// so a body of "[[[[…" must never reach the parser.
bool json_depth_within(std::string_view text, std::size_t max_depth);

}  // namespace kb
