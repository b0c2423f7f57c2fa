#pragma once
// The Store in a SQLite file (Debian's libsqlite3): `state_dir/state.db`, WAL journal, one
// transaction per put/remove, a schema version (PRAGMA user_version) with migrations applied at
// open. An operator reads it with `sqlite3` (docs/state.md has the tables and example queries).
//
// The file holds link secrets and Jupyter keys (table `secrets`), so it is created with mode 0600
// in a directory created 0700, and a file that others may read is refused.
#include <memory>
#include <string>

#include "store/store.hpp"

namespace kb::store {

// The schema this build writes; older files are migrated when opened, newer ones are refused.
inline constexpr int kSchemaVersion = 2;

struct SqliteOptions {
  // A file that is not a readable kernel-bridge state database (corrupt, not SQLite, from a newer
  // kernel-bridge): false (the default): open fails with StoreError naming the file, so `serve`
  // refuses to start rather than forget kernels. true (`serve --start-empty`): the file (and its
  // -wal and -shm files) is renamed to "<file>.unreadable-<UTC time>" and an empty store is made.
  // A file with the wrong mode or that cannot be opened at all is refused either way.
  bool start_empty_if_unreadable = false;
};

struct SqliteOpened {
  std::unique_ptr<Store> store;
  int migrated_from = 0;     // the file's schema version before open, if it was migrated (else 0)
  std::string moved_aside;   // where an unreadable file went (start_empty_if_unreadable)
  std::string moved_reason;  // why it was unreadable
};

// Opens (creating if needed) the database at `path`. Throws StoreError naming the file.
SqliteOpened open_sqlite_store(const std::string& path, const SqliteOptions& options = {});

// What `kernel-bridge doctor` shows of a database, read-only (nothing is created or migrated).
struct SqliteInspection {
  bool exists = false;
  int schema_version = 0;
  int allocations = 0;
  int live_kernels = 0;  // kernels not ended
  int kernels = 0;
  std::string problem;  // empty: usable as it is (or after migration: schema_version < current)
};
SqliteInspection inspect_sqlite_store(const std::string& path);

}  // namespace kb::store
