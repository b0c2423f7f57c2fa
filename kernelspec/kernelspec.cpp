#include "kernelspec/kernelspec.hpp"

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "link/connection_file.hpp"

namespace kb::bridge {

namespace fs = std::filesystem;

std::vector<std::string> wrapper_arguments(const WrapperRequest& r) {
  std::vector<std::string> args{"kernel"};
  auto add = [&args](const char* flag, const std::string& value) {
    args.emplace_back(flag);
    args.push_back(value);
  };
  if (!r.socket.empty()) add("--socket", r.socket);
  add("--site", r.site);
  if (r.kernel) add("--kernel", *r.kernel);
  if (!r.kernel_argv.empty()) add("--kernel-argv", nlohmann::json(r.kernel_argv).dump());
  if (r.queue) add("--partition", *r.queue);
  if (r.nodes) add("--nodes", std::to_string(*r.nodes));
  if (r.gpus) add("--gpus", std::to_string(*r.gpus));
  if (r.runtime) add("--runtime", *r.runtime);
  if (r.project) add("--project", *r.project);
  if (r.reservation) add("--reservation", *r.reservation);
  if (r.qos) add("--qos", *r.qos);
  if (r.memory) add("--memory", *r.memory);
  if (!r.name.empty()) add("--name", r.name);
  if (r.lease) add("--lease", std::to_string(*r.lease));
  args.emplace_back("{connection_file}");
  return args;
}

nlohmann::json resources_json(const WrapperRequest& r) {
  nlohmann::json res = nlohmann::json::object();
  if (r.queue) res["queue"] = *r.queue;
  if (r.nodes) res["nodes"] = *r.nodes;
  if (r.gpus) res["gpus"] = *r.gpus;
  if (r.runtime) res["runtime"] = *r.runtime;
  if (r.project) res["project"] = *r.project;
  if (r.reservation) res["reservation"] = *r.reservation;
  if (r.qos) res["qos"] = *r.qos;
  if (r.memory) res["memory"] = *r.memory;
  return res;
}

std::string validate_kernel_name(const std::string& name) {
  if (name.empty())
    throw KernelspecError("the kernel name is empty; give --name, e.g. --name hpc-python");
  if (name.size() > 128) throw KernelspecError("the kernel name is longer than 128 characters");
  std::string lower;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) {
      throw KernelspecError("kernel name '" + name + "' contains '" + std::string(1, c) +
                            "': Jupyter allows only letters, digits, '.', '_' and '-'");
    }
    lower.push_back(static_cast<char>((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c));
  }
  if (lower == "." || lower == "..")
    throw KernelspecError("kernel name '" + name + "' is not a name");
  return lower;
}

std::vector<std::string> split_command_line(const std::string& text) {
  std::size_t first = text.find_first_not_of(" \t\n");
  if (first != std::string::npos && text[first] == '[') {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_array()) {
      throw KernelspecError("the kernel argv starts with '[' but is not a JSON array of strings: " +
                            text);
    }
    std::vector<std::string> out;
    for (const auto& item : j) {
      if (!item.is_string())
        throw KernelspecError("the kernel argv's JSON array holds a non-string: " + item.dump());
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  char quote = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (quote) {
      if (c == quote) {
        quote = 0;
      } else if (c == '\\' && quote == '"' && i + 1 < text.size() &&
                 (text[i + 1] == '"' || text[i + 1] == '\\')) {
        word.push_back(text[++i]);
      } else {
        word.push_back(c);
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
      in_word = true;
    } else if (c == '\\' && i + 1 < text.size()) {
      word.push_back(text[++i]);
      in_word = true;
    } else if (c == ' ' || c == '\t' || c == '\n') {
      if (in_word) words.push_back(std::move(word));
      word.clear();
      in_word = false;
    } else {
      word.push_back(c);
      in_word = true;
    }
  }
  if (quote)
    throw KernelspecError(std::string("unbalanced ") + quote + " in the kernel argv: " + text);
  if (in_word) words.push_back(std::move(word));
  return words;
}

std::string jupyter_user_data_dir() {
  if (const char* d = std::getenv("JUPYTER_DATA_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/jupyter";
  std::string home;
  if (const char* h = std::getenv("HOME"); h && *h) {
    home = h;
  } else if (const passwd* pw = ::getpwuid(::getuid()); pw && pw->pw_dir) {
    home = pw->pw_dir;
  } else {
    throw KernelspecError(
        "cannot find your home directory (HOME is unset); give --jupyter-path DIR");
  }
  return home + "/.local/share/jupyter";
}

std::string self_executable() {
  std::error_code ec;
  auto path = fs::read_symlink("/proc/self/exe", ec);
  if (ec)
    throw KernelspecError("cannot find the kernel-bridge executable (/proc/self/exe): " +
                          ec.message());
  return path.string();
}

nlohmann::json make_kernel_json(const KernelspecInstall& spec) {
  if (spec.request.site.empty())
    throw KernelspecError("--site is required: the [[site]] name from the bridge's configuration");
  if (spec.request.kernel && !spec.request.kernel_argv.empty()) {
    throw KernelspecError(
        "give either --kernel (a kernel the site's configuration names) or --kernel-argv, not "
        "both");
  }
  if (!spec.request.kernel_argv.empty()) {
    bool has_placeholder = false;
    for (const auto& a : spec.request.kernel_argv)
      has_placeholder |= a.find("{connection_file}") != std::string::npos;
    if (!has_placeholder) {
      throw KernelspecError(
          "--kernel-argv must contain {connection_file} (the agent puts the kernel's "
          "connection file there), e.g. \"python3 -m ipykernel_launcher -f {connection_file}\"");
    }
  }
  nlohmann::json argv = nlohmann::json::array();
  argv.push_back(spec.executable.empty() ? self_executable() : spec.executable);
  for (auto& a : wrapper_arguments(spec.request)) argv.push_back(a);

  nlohmann::json meta = {{"site", spec.request.site}, {"resources", resources_json(spec.request)}};
  if (spec.request.kernel) meta["kernel"] = *spec.request.kernel;
  if (!spec.request.kernel_argv.empty()) meta["kernel_argv"] = spec.request.kernel_argv;

  std::string display = spec.display_name;
  if (display.empty()) display = spec.request.site + ": Python (kernel-bridge)";
  return nlohmann::json{
      {"argv", argv},
      {"display_name", display},
      {"language", spec.language},
      // Jupyter sends SIGINT to the wrapper, which turns it into an interrupt of the
      // remote kernel; "message" would need the hub-side control channel to be up.
      {"interrupt_mode", "signal"},
      {"env", nlohmann::json::object()},
      {"metadata", {{"kernel_bridge", meta}}}};
}

std::string install_kernelspec(const KernelspecInstall& spec) {
  const std::string name = validate_kernel_name(spec.name);
  if (!spec.prefix.empty() && !spec.jupyter_path.empty()) {
    throw KernelspecError("give at most one of --user, --prefix and --jupyter-path");
  }
  std::string data_dir;
  if (!spec.jupyter_path.empty()) {
    data_dir = spec.jupyter_path;
  } else if (!spec.prefix.empty()) {
    data_dir = spec.prefix + "/share/jupyter";
  } else {
    data_dir = jupyter_user_data_dir();
  }
  nlohmann::json kernel_json = make_kernel_json(spec);
  const fs::path dir = fs::absolute(fs::path(data_dir) / "kernels" / name);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw KernelspecError("cannot create " + dir.string() + ": " + ec.message() +
                          " (choose a writable place with --user, --prefix or --jupyter-path)");
  }
  try {
    // No secret in kernel.json: it is world-readable, like every kernelspec.
    tunnel::write_file_atomic((dir / "kernel.json").string(), kernel_json.dump(1) + "\n", 0644);
  } catch (const tunnel::ConnectionFileError& e) {
    throw KernelspecError(e.what());
  }
  return dir.string();
}

}  // namespace kb::bridge
