// The SQLite store (store/sqlite_store.hpp): opening with checks (mode, integrity, schema version),
// the schema and its migrations, and one prepared statement per operation.
#include "store/sqlite_store.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <string_view>
#include <utility>

namespace kb::store {

namespace {

// Schema 1: allocations (with their secrets) and kernels.
constexpr const char* kSchema1 = R"sql(
CREATE TABLE allocations (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, site TEXT NOT NULL, phase TEXT NOT NULL,
  job_url TEXT NOT NULL, job_id TEXT NOT NULL, working_dir TEXT NOT NULL, queue TEXT NOT NULL,
  node TEXT NOT NULL, agent_host TEXT NOT NULL, agent_port INTEGER NOT NULL,
  agent_hostname TEXT NOT NULL, hub_ip TEXT NOT NULL, shell_port INTEGER NOT NULL,
  iopub_port INTEGER NOT NULL, stdin_port INTEGER NOT NULL, control_port INTEGER NOT NULL,
  hb_port INTEGER NOT NULL, resources TEXT NOT NULL, link_secret TEXT NOT NULL,
  jupyter_key TEXT NOT NULL, signature_scheme TEXT NOT NULL, created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL);
CREATE TABLE kernels (
  id TEXT PRIMARY KEY, allocation_id TEXT NOT NULL, owner TEXT NOT NULL, site TEXT NOT NULL,
  state TEXT NOT NULL, end_cause TEXT NOT NULL, reason TEXT NOT NULL, lease_s INTEGER NOT NULL,
  view TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE INDEX kernels_by_owner ON kernels(owner);
)sql";

// Schema 2: the secrets move to a table of their own, so that an operator's
// `SELECT * FROM allocations` does not print them.
constexpr const char* kMigrate1to2 = R"sql(
CREATE TABLE secrets (
  allocation_id TEXT PRIMARY KEY, link_secret TEXT NOT NULL, jupyter_key TEXT NOT NULL,
  signature_scheme TEXT NOT NULL);
INSERT INTO secrets SELECT id, link_secret, jupyter_key, signature_scheme FROM allocations;
ALTER TABLE allocations DROP COLUMN link_secret;
ALTER TABLE allocations DROP COLUMN jupyter_key;
ALTER TABLE allocations DROP COLUMN signature_scheme;
)sql";

// migrations[v] takes a file from schema v to v + 1.
constexpr std::pair<int, const char*> kMigrations[] = {{1, kMigrate1to2}};
static_assert(std::size(kMigrations) + 1 == kSchemaVersion);

// A database file the store cannot use as it is; `serve --start-empty` may move it aside.
struct Unreadable : StoreError {
  using StoreError::StoreError;
};

class Statement {
 public:
  Statement(sqlite3* db, const std::string& path, const char* sql) : path_(path) {
    if (sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr) != SQLITE_OK) {
      throw StoreError("state database " + path + ": " + sqlite3_errmsg(db));
    }
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  // Binds the next parameter (the first, after a step that finished).
  Statement& bind(std::string_view text) {
    sqlite3_bind_text(stmt_, ++bound_, text.data(), static_cast<int>(text.size()),
                      SQLITE_TRANSIENT);
    return *this;
  }
  Statement& bind(std::int64_t value) {
    sqlite3_bind_int64(stmt_, ++bound_, value);
    return *this;
  }
  // True while there is a row; false when done. Throws on error.
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    const std::string error = sqlite3_errmsg(sqlite3_db_handle(stmt_));
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
    bound_ = 0;
    if (rc == SQLITE_DONE) return false;
    throw StoreError("state database " + path_ + ": " + error);
  }
  void run() {
    while (step()) {
    }
  }
  std::string text(int column) const {
    const auto* p = sqlite3_column_text(stmt_, column);
    return p ? std::string(reinterpret_cast<const char*>(p),
                           static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)))
             : std::string();
  }
  std::int64_t integer(int column) const { return sqlite3_column_int64(stmt_, column); }

 private:
  sqlite3_stmt* stmt_ = nullptr;
  std::string path_;
  int bound_ = 0;
};

// The first column of the last row a query returns (counts, PRAGMA values).
std::int64_t query_int(sqlite3* db, const std::string& path, const char* sql) {
  Statement s(db, path, sql);
  std::int64_t value = 0;
  while (s.step()) value = s.integer(0);
  return value;
}

// What PRAGMA quick_check finds, "; "-separated; empty when the file is sound. Throws StoreError
// when the file cannot even be read that far.
std::string integrity_problems(sqlite3* db, const std::string& path) {
  Statement check(db, path, "PRAGMA quick_check(5)");
  std::string problems;
  while (check.step()) {
    const std::string line = check.text(0);
    if (line != "ok") problems += (problems.empty() ? "" : "; ") + line;
  }
  return problems;
}

// Why an existing file cannot hold link secrets: not a regular file, or others may read or write
// it. Empty when it can.
std::string private_file_problem(const std::string& path, const struct stat& st) {
  if (!S_ISREG(st.st_mode)) return "state database " + path + " is not a regular file";
  if ((st.st_mode & 077) == 0) return "";
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
  return "state database " + path + " has mode " + mode +
         ", but it holds link secrets: only the service account may read it (chmod 600 " + path +
         ")";
}

std::string utc_stamp() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

// The directory (made 0700 if missing) and the file (made 0600 if missing; refused if others may
// read or write it: it holds link secrets).
void prepare_file(const std::string& path) {
  std::filesystem::path file(path);
  const auto dir = file.parent_path().empty() ? std::filesystem::path(".") : file.parent_path();
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    throw StoreError("cannot create the state directory " + dir.string() + ": " +
                     std::strerror(errno) + " (check bridge.state_dir)");
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (auto problem = private_file_problem(path, st); !problem.empty()) throw StoreError(problem);
    return;
  }
  const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0 && errno != EEXIST) {
    throw StoreError("cannot create the state database " + path + ": " + std::strerror(errno) +
                     " (check bridge.state_dir and the service account's rights)");
  }
  if (fd >= 0) ::close(fd);
}

class SqliteStore final : public Store {
 public:
  explicit SqliteStore(std::string path) : path_(std::move(path)) {}
  ~SqliteStore() override {
    statements_ = {};
    if (db_) sqlite3_close_v2(db_);
  }

  // Opens the file and brings it to kSchemaVersion; returns the version it had (0: new file).
  int open() {
    if (sqlite3_open_v2(path_.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK) {
      throw StoreError("cannot open the state database " + path_ + ": " +
                       (db_ ? sqlite3_errmsg(db_) : "out of memory"));
    }
    sqlite3_extended_result_codes(db_, 1);
    sqlite3_busy_timeout(db_, 2000);  // an operator's sqlite3 may hold a read lock briefly
    // The first statement reads the header: a file that is not SQLite fails here.
    try {
      exec("PRAGMA journal_mode=WAL");
    } catch (const StoreError& e) {
      throw Unreadable(e.what());
    }
    exec("PRAGMA synchronous=NORMAL");
    // Deleted rows are overwritten, not left in free pages: an ended job's secrets do not stay on
    // disk (remove_allocation also truncates the WAL, which holds older copies of pages).
    exec("PRAGMA secure_delete=ON");
    check_integrity();
    const int version = user_version();
    if (version > kSchemaVersion) {
      throw Unreadable("state database " + path_ + " has schema version " +
                       std::to_string(version) + ", written by a newer kernel-bridge (this one " +
                       "knows up to " + std::to_string(kSchemaVersion) +
                       "): run that version, or start empty");
    }
    if (version == 0 && count_tables() != 0) {
      throw Unreadable("state database " + path_ +
                       " has tables but no schema version: it is not kernel-bridge's");
    }
    if (version < kSchemaVersion) {
      transaction([&] {
        if (version == 0) exec(kSchema1);  // a new file starts at schema 1, then migrates
        for (const auto& [from, sql] : kMigrations) {
          if (from >= std::max(version, 1)) exec(sql);
        }
        exec("PRAGMA user_version=" + std::to_string(kSchemaVersion));
      });
    }
    prepare();
    return version;
  }

  Snapshot load() override {
    Snapshot snap;
    auto& a = *statements_.load_allocations;
    while (a.step()) {
      AllocationRecord r;
      int c = 0;
      r.id = a.text(c++);
      r.owner = a.text(c++);
      r.site = a.text(c++);
      r.phase = a.text(c++);
      r.job_url = a.text(c++);
      r.job_id = a.text(c++);
      r.working_dir = a.text(c++);
      r.queue = a.text(c++);
      r.node = a.text(c++);
      r.agent_host = a.text(c++);
      r.agent_port = port(a.integer(c++));
      r.agent_hostname = a.text(c++);
      r.hub_ip = a.text(c++);
      for (auto& p : r.ports) p = port(a.integer(c++));
      r.resources_json = a.text(c++);
      r.created_ms = a.integer(c++);
      r.updated_ms = a.integer(c++);
      r.link_secret_hex = a.text(c++);
      r.jupyter_key = a.text(c++);
      r.signature_scheme = a.text(c++);
      snap.allocations.push_back(std::move(r));
    }
    auto& k = *statements_.load_kernels;
    while (k.step()) {
      KernelRecord r;
      int c = 0;
      r.id = k.text(c++);
      r.allocation_id = k.text(c++);
      r.owner = k.text(c++);
      r.site = k.text(c++);
      r.state = k.text(c++);
      r.end_cause = k.text(c++);
      r.reason = k.text(c++);
      r.lease_s = k.integer(c++);
      r.view_json = k.text(c++);
      r.created_ms = k.integer(c++);
      r.updated_ms = k.integer(c++);
      snap.kernels.push_back(std::move(r));
    }
    return snap;
  }

  void put(const AllocationRecord& r) override {
    transaction([&] {
      auto& s = *statements_.put_allocation;
      s.bind(r.id).bind(r.owner).bind(r.site).bind(r.phase).bind(r.job_url).bind(r.job_id);
      s.bind(r.working_dir).bind(r.queue).bind(r.node).bind(r.agent_host);
      s.bind(std::int64_t{r.agent_port}).bind(r.agent_hostname).bind(r.hub_ip);
      for (auto p : r.ports) s.bind(std::int64_t{p});
      s.bind(r.resources_json).bind(r.created_ms).bind(r.updated_ms).run();
      statements_.put_secret->bind(r.id)
          .bind(r.link_secret_hex)
          .bind(r.jupyter_key)
          .bind(r.signature_scheme)
          .run();
    });
  }

  void put(const KernelRecord& r) override {
    auto& s = *statements_.put_kernel;
    s.bind(r.id).bind(r.allocation_id).bind(r.owner).bind(r.site).bind(r.state);
    s.bind(r.end_cause).bind(r.reason).bind(r.lease_s).bind(r.view_json).bind(r.created_ms);
    s.bind(r.updated_ms).run();
  }

  void remove_allocation(const std::string& id) override {
    transaction([&] {
      statements_.remove_allocation->bind(id).run();
      statements_.remove_secret->bind(id).run();
    });
    // The WAL still holds the pages as they were, secrets included: copy the change into the
    // database file and empty the WAL. Busy (an operator's reader) is not an error: the next
    // removal does it.
    sqlite3_wal_checkpoint_v2(db_, nullptr, SQLITE_CHECKPOINT_TRUNCATE, nullptr, nullptr);
  }

  void remove_kernel(const std::string& id) override { statements_.remove_kernel->bind(id).run(); }

  std::string where() const override { return "sqlite " + path_; }

 private:
  static std::uint16_t port(std::int64_t v) {
    return v > 0 && v <= 65535 ? static_cast<std::uint16_t>(v) : 0;
  }

  void exec(const std::string& sql) {
    char* error = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
      std::string message = error ? error : sqlite3_errmsg(db_);
      sqlite3_free(error);
      throw StoreError("state database " + path_ + ": " + message);
    }
  }

  template <class F>
  void transaction(F&& body) {
    exec("BEGIN IMMEDIATE");
    try {
      body();
      exec("COMMIT");
    } catch (...) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }
  }

  void check_integrity() {
    std::string problems;
    try {
      problems = integrity_problems(db_, path_);
    } catch (const StoreError& e) {
      throw Unreadable(e.what());
    }
    if (!problems.empty()) {
      throw Unreadable("state database " + path_ + " is corrupt: " + problems);
    }
  }

  int user_version() { return static_cast<int>(query_int(db_, path_, "PRAGMA user_version")); }

  int count_tables() {
    return static_cast<int>(
        query_int(db_, path_, "SELECT count(*) FROM sqlite_master WHERE type = 'table'"));
  }

  void prepare() {
    auto make = [&](const char* sql) { return std::make_unique<Statement>(db_, path_, sql); };
    statements_.load_allocations = make(
        "SELECT a.id, owner, site, phase, job_url, job_id, working_dir, queue, node, agent_host, "
        "agent_port, agent_hostname, hub_ip, shell_port, iopub_port, stdin_port, control_port, "
        "hb_port, resources, created_ms, updated_ms, coalesce(s.link_secret, ''), "
        "coalesce(s.jupyter_key, ''), coalesce(s.signature_scheme, '') FROM allocations a LEFT "
        "JOIN secrets s ON s.allocation_id = a.id ORDER BY created_ms, a.id");
    statements_.load_kernels = make(
        "SELECT id, allocation_id, owner, site, state, end_cause, reason, lease_s, view, "
        "created_ms, updated_ms FROM kernels ORDER BY created_ms, id");
    statements_.put_allocation = make(
        "INSERT INTO allocations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "?, ?) ON CONFLICT(id) DO UPDATE SET owner = excluded.owner, site = excluded.site, phase = "
        "excluded.phase, job_url = excluded.job_url, job_id = excluded.job_id, working_dir = "
        "excluded.working_dir, queue = excluded.queue, node = excluded.node, agent_host = "
        "excluded.agent_host, agent_port = excluded.agent_port, agent_hostname = "
        "excluded.agent_hostname, hub_ip = excluded.hub_ip, shell_port = excluded.shell_port, "
        "iopub_port = excluded.iopub_port, stdin_port = excluded.stdin_port, control_port = "
        "excluded.control_port, hb_port = excluded.hb_port, resources = excluded.resources, "
        "updated_ms = excluded.updated_ms");
    statements_.put_secret = make(
        "INSERT INTO secrets VALUES (?, ?, ?, ?) ON CONFLICT(allocation_id) DO UPDATE SET "
        "link_secret = excluded.link_secret, jupyter_key = excluded.jupyter_key, "
        "signature_scheme = excluded.signature_scheme");
    statements_.put_kernel = make(
        "INSERT INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
        "SET allocation_id = excluded.allocation_id, owner = excluded.owner, site = "
        "excluded.site, state = excluded.state, end_cause = excluded.end_cause, reason = "
        "excluded.reason, lease_s = excluded.lease_s, view = excluded.view, updated_ms = "
        "excluded.updated_ms");
    statements_.remove_allocation = make("DELETE FROM allocations WHERE id = ?");
    statements_.remove_secret = make("DELETE FROM secrets WHERE allocation_id = ?");
    statements_.remove_kernel = make("DELETE FROM kernels WHERE id = ?");
  }

  std::string path_;
  sqlite3* db_ = nullptr;
  struct Statements {
    std::unique_ptr<Statement> load_allocations, load_kernels, put_allocation, put_secret,
        put_kernel, remove_allocation, remove_secret, remove_kernel;
  } statements_;
};

// Renames the database and its WAL files aside; returns the new name of the database.
std::string move_aside(const std::string& path) {
  const std::string aside = path + ".unreadable-" + utc_stamp();
  for (const char* suffix : {"", "-wal", "-shm"}) {
    const std::string from = path + suffix;
    if (::access(from.c_str(), F_OK) != 0) continue;
    if (::rename(from.c_str(), (aside + suffix).c_str()) != 0) {
      throw StoreError("cannot move the unreadable state database " + from +
                       " aside: " + std::strerror(errno));
    }
  }
  return aside;
}

}  // namespace

SqliteInspection inspect_sqlite_store(const std::string& path) {
  SqliteInspection out;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) out.problem = std::string("cannot stat it: ") + std::strerror(errno);
    return out;
  }
  out.exists = true;
  out.problem = private_file_problem(path, st);
  if (!out.problem.empty()) return out;
  sqlite3* db = nullptr;
  const std::string uri = "file:" + path + "?mode=ro";
  if (sqlite3_open_v2(uri.c_str(), &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nullptr) !=
      SQLITE_OK) {
    out.problem = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close_v2(db);
    return out;
  }
  sqlite3_busy_timeout(db, 2000);
  auto count = [&](const char* sql) { return static_cast<int>(query_int(db, path, sql)); };
  try {
    out.schema_version = count("PRAGMA user_version");
    if (out.schema_version > kSchemaVersion) {
      out.problem = "schema version " + std::to_string(out.schema_version) +
                    ", written by a newer kernel-bridge";
    } else if (out.schema_version >= 1) {
      if (auto problems = integrity_problems(db, path); !problems.empty()) {
        out.problem = "corrupt: " + problems;
      } else {
        out.allocations = count("SELECT count(*) FROM allocations");
        out.kernels = count("SELECT count(*) FROM kernels");
        out.live_kernels = count("SELECT count(*) FROM kernels WHERE state != 'ended'");
      }
    } else if (count("SELECT count(*) FROM sqlite_master WHERE type = 'table'") != 0) {
      out.problem = "has tables but no schema version: not kernel-bridge's";
    }
  } catch (const StoreError& e) {
    out.problem = e.what();
  }
  sqlite3_close_v2(db);
  return out;
}

SqliteOpened open_sqlite_store(const std::string& path, const SqliteOptions& options) {
  prepare_file(path);
  SqliteOpened opened;
  auto store = std::make_unique<SqliteStore>(path);
  try {
    const int version = store->open();
    if (version != 0 && version < kSchemaVersion) opened.migrated_from = version;
  } catch (const Unreadable& e) {
    store.reset();
    if (!options.start_empty_if_unreadable) {
      throw StoreError(std::string(e.what()) +
                       ". kernel-bridge refuses to start rather than forget the kernels it "
                       "records; repair or restore the file, or start with --start-empty (the "
                       "file is then kept beside it under another name)");
    }
    opened.moved_reason = e.what();
    opened.moved_aside = move_aside(path);
    prepare_file(path);
    store = std::make_unique<SqliteStore>(path);
    store->open();
  }
  opened.store = std::move(store);
  return opened;
}

}  // namespace kb::store
