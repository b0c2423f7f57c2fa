#pragma once
// The kernelspec wrapper (`kernel-bridge kernel … CONNECTION_FILE`), the front door for Jupyter:
// Jupyter's local provisioner runs it as "the kernel". It reads Jupyter's connection file, asks the
// daemon (control API, Unix socket) for a remote kernel on exactly those hub-side ports with that
// key, reports progress on stderr, lives as long as the remote kernel (also while its link is
// reconnecting) and exits with the kernel's status. SIGINT → interrupt, SIGTERM/SIGHUP → orderly
// shutdown. Called from the CLI's main thread only, before any other thread exists (it blocks the
// signals it handles in every thread it creates).
#include <nlohmann/json.hpp>

#include <string>

#include "kernelspec/kernelspec.hpp"

namespace kb::bridge {

// The control API request for this connection file (no network). Throws KernelspecError (bad
// request options) or tunnel::ConnectionFileError (bad connection file, message names file+field).
nlohmann::json make_create_request(const WrapperRequest& request,
                                   const std::string& connection_file);

// The wrapper's exit status for an ended kernel view: 0 after an orderly shutdown, the kernel's
// exit code (128+signal for a signal) when it exited by itself, 1 for every other end.
int exit_status_for(const nlohmann::json& kernel_view);

// Runs the wrapper; returns the process exit status (2: bad input, 1: refused or failed, …).
int run_kernel_wrapper(const WrapperRequest& request, const std::string& connection_file);

// One progress line as the wrapper prints it: "<UTC time> kernel-bridge: <message>".
std::string progress_line(const std::string& message);

}  // namespace kb::bridge
