#pragma once
// Handing the kernels' connections from one serve process to the next (planned restart,
// docs/state.md). What is handed over: per kernel, its five listening sockets and its link session
// with every Jupyter client connection (KernelLifecycle::hand_over), described in one JSON
// document, and the descriptors themselves. Two ways, one format:
// - `systemctl restart`: the old process gives everything to systemd's file-descriptor store
//   (sd_notify FDSTORE=1, the unit's FileDescriptorStoreMax=); systemd passes it to the new one.
// - re-exec (SIGUSR2, also for an upgrade in place): the process executes its binary again with
//   the descriptors inherited, the same PID.
// Either way the new process finds them by the socket-activation convention (LISTEN_FDS,
// LISTEN_PID, LISTEN_FDNAMES): the document is the memory file named "kb-handover", descriptor i
// is named "kb-fd-<i>".
#include <optional>
#include <string>
#include <vector>

#include "bridge/lifecycle.hpp"

namespace kb::bridge {

// The JSON document and the descriptors it refers to by index.
struct HandoverPackage {
  std::string document;
  std::vector<int> fds;
};

HandoverPackage encode_handover(const std::vector<HandedOver>& kernels);
// Throws std::runtime_error for a document that is not one (the descriptors are not closed).
std::vector<HandedOver> decode_handover(const std::string& document, const std::vector<int>& fds);

// NOTIFY_SOCKET is set: a service manager listens.
bool service_manager_present();
// sd_notify(3): sends `state` ("READY=1", "STOPPING=1", "STATUS=…"); false if not possible.
bool notify_service_manager(const std::string& state);

// Gives the package to systemd's file-descriptor store. `error` says why not.
bool push_to_fdstore(const HandoverPackage& package, std::string& error);

// The executable and arguments to run again for a re-exec, taken at start (before an upgrade
// replaces the file). Empty path: unknown.
struct ExecSelf {
  std::string path;
  std::vector<std::string> argv;
};
ExecSelf exec_self_now();
// Executes `self` with the package inherited (LISTEN_FDS). Returns only on failure (`error`); the
// process's descriptors may then be disturbed, so the caller exits.
void reexec_with(const ExecSelf& self, const HandoverPackage& package, std::string& error);

// At start: what a previous process handed over, if anything; the descriptors are taken out of the
// service manager's store (so only this process holds the clients' connections) and LISTEN_* is
// cleared. A document that cannot be read is reported in `error` and its descriptors closed: the
// kernels then re-attach with new link sessions.
std::vector<HandedOver> receive_handover(std::string& error);

}  // namespace kb::bridge
