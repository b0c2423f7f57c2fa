#pragma once
// Kernelspecs that run a kernel through kernel-bridge: where Jupyter looks for them (jupyter_core's
// rules) and the kernel.json whose argv starts `kernel-bridge kernel … {connection_file}`.
// Plain functions for the CLI (`kernel-bridge kernelspec install`); callable from any thread; the
// install does blocking I/O on small local files.
#include <nlohmann/json.hpp>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace kb::bridge {

// Bad input or an unwritable destination; what() says what is wrong and what to do.
struct KernelspecError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What the wrapper asks for: everything `kernel-bridge kernel` accepts besides the connection file.
// Shared by `kernelspec install` (written into argv) and `kernel` (sent to the daemon).
struct WrapperRequest {
  std::string socket;  // control API socket; empty: the default
  std::string site;
  std::optional<std::string> kernel;     // a [site.kernels] name
  std::vector<std::string> kernel_argv;  // a raw argv with {connection_file}; empty: site default
  std::optional<std::string> queue;      // partition
  std::optional<int> nodes;
  std::optional<int> gpus;
  std::optional<std::string> runtime;  // "2h", "90m", … as the daemon parses it
  std::optional<std::string> project;
  std::optional<std::string> reservation;
  std::optional<std::string> qos;
  std::optional<std::string> memory;  // "16G"
  std::string name;                   // label for `kernel-bridge list`
  // Seconds the daemon waits without a status request from this wrapper before it treats the
  // wrapper as gone (killed, host lost) and shuts the kernel down. Empty: kDefaultWrapperLease.
  std::optional<int> lease;
};

// The wrapper asks for its kernel's status at least every 30 s (long poll), so 90 s of silence
// means it is gone.
inline constexpr int kDefaultWrapperLease = 90;

// The argv after the executable: ["kernel", "--site", S, …, "{connection_file}"].
std::vector<std::string> wrapper_arguments(const WrapperRequest& request);

// The request's resources as the control API's "resources" object (only the fields given).
nlohmann::json resources_json(const WrapperRequest& request);

// Jupyter's kernel names: letters, digits, '.', '_', '-' (jupyter_client's rule); lower-cased by
// Jupyter. Throws KernelspecError naming the bad character.
std::string validate_kernel_name(const std::string& name);

// Splits a command line into words: whitespace separates, '…' and "…" quote, \ escapes; or, when
// it starts with '[', a JSON array of strings. Throws KernelspecError on unbalanced quotes.
std::vector<std::string> split_command_line(const std::string& text);

// jupyter_core's user data dir: $JUPYTER_DATA_DIR, else $XDG_DATA_HOME/jupyter, else
// ~/.local/share/jupyter (Linux rules).
std::string jupyter_user_data_dir();

struct KernelspecInstall {
  std::string name;
  std::string display_name;  // empty: "<site>: Python (kernel-bridge)"
  std::string language = "python";
  std::string executable;  // absolute path of kernel-bridge in argv
  WrapperRequest request;
  // Exactly one destination: the user's data dir (default), --prefix (PREFIX/share/jupyter), or
  // --jupyter-path (a data dir, as in JUPYTER_PATH).
  std::string prefix;
  std::string jupyter_path;
};

nlohmann::json make_kernel_json(const KernelspecInstall& spec);

// Writes <data dir>/kernels/<name>/kernel.json (0644, atomically) and returns the directory.
std::string install_kernelspec(const KernelspecInstall& spec);

// The absolute path of the running executable (/proc/self/exe).
std::string self_executable();

}  // namespace kb::bridge
