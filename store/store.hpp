#pragma once
// The bridge's durable state: what `serve` needs to re-attach to every live kernel after its own
// restart or crash (docs/state.md). Two kinds of record, written as they change:
//   - an *allocation*: a batch job and its agent (site, job URL, the agent's address, the hub-side
//     ports, the link secret and the Jupyter key that let a new bridge process authenticate to the
//     same agent and serve the same kernel);
//   - a *kernel*: one Jupyter kernel as the control API shows it (owner, state, reason, history),
//     attached to an allocation while it lives.
// The store knows nothing about kernels' semantics: the lifecycle (bridge/lifecycle_store.cpp)
// turns its objects into records and back. Users' UNICORE tokens are never stored (memory only).
//
// `Store` is the seam for a second implementation on a shared database (docs/scale-out.md); the
// one implemented is SQLite in `state_dir` (store/sqlite_store.hpp).
// Thread model: one thread (the io_context's); calls block briefly (a local SQLite transaction).
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace kb::store {

// Opening, reading or writing the store failed. The message names the file and says what to do.
struct StoreError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct AllocationRecord {
  std::string id;  // the allocation's id (its first kernel's id)
  std::string owner;
  std::string site;
  std::string phase;  // the lifecycle's AllocationPhase, by name
  std::string job_url, job_id, working_dir, queue, node;
  std::string agent_host;  // empty until the agent's discovery file was read
  std::uint16_t agent_port = 0;
  std::string agent_hostname;
  std::string hub_ip;
  std::array<std::uint16_t, 5> ports{};  // shell, iopub, stdin, control, hb
  std::string resources_json;            // the resources asked for (the lifecycle's form)
  std::int64_t created_ms = 0;           // Unix time, milliseconds
  std::int64_t updated_ms = 0;
  // Secrets: stored in their own table, readable only by the service account (the file's mode).
  std::string link_secret_hex;  // 64 hex characters
  std::string jupyter_key;
  std::string signature_scheme;
};

struct KernelRecord {
  std::string id;
  std::string allocation_id;  // empty once detached (ended)
  std::string owner;
  std::string site;
  std::string state;      // KernelState by name
  std::string end_cause;  // EndCause by name
  std::string reason;
  std::int64_t lease_s = 0;
  std::string view_json;  // the whole view, as the lifecycle writes and reads it
  std::int64_t created_ms = 0;
  std::int64_t updated_ms = 0;
};

struct Snapshot {
  std::vector<AllocationRecord> allocations;
  std::vector<KernelRecord> kernels;
};

class Store {
 public:
  virtual ~Store() = default;
  // Everything stored (read at start-up). Throws StoreError.
  virtual Snapshot load() = 0;
  // Insert or replace by id; each call is one transaction. Throw StoreError.
  virtual void put(const AllocationRecord& allocation) = 0;
  virtual void put(const KernelRecord& kernel) = 0;
  // Removing an id that is not there is not an error.
  virtual void remove_allocation(const std::string& id) = 0;
  virtual void remove_kernel(const std::string& id) = 0;
  // For logs and health: e.g. "sqlite /var/lib/kernel-bridge/state.db".
  virtual std::string where() const = 0;
};

}  // namespace kb::store
