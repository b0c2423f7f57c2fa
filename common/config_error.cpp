#include "common/config_error.hpp"

#include <utility>

namespace kb {
namespace {

std::string format_location(const std::string& file, int line) {
  if (line > 0) return file + ":" + std::to_string(line);
  return file;
}

}  // namespace

ConfigError::ConfigError(std::string file_, int line_, std::string message_)
    : std::runtime_error(format_location(file_, line_) + ": " + message_),
      file(std::move(file_)),
      line(line_),
      message(std::move(message_)) {}

}  // namespace kb
