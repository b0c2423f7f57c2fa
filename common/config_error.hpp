#pragma once
// ConfigError: a file an operator wrote (the configuration, the API tokens file) is invalid. what()
// is "file:line: what is wrong" (line 0 omitted when unknown), ready to print; `serve` and
// `config check` exit 2 on it.
#include <stdexcept>
#include <string>

namespace kb {

struct ConfigError : std::runtime_error {
  ConfigError(std::string file, int line, std::string message);
  std::string file;
  int line;
  std::string message;
};

}  // namespace kb
