#include "store/sqlite_store.hpp"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <filesystem>
#include <string>

#include "tests/common/temp_dir.hpp"

namespace kb::store {
namespace {

using kb::test::TempDir;

AllocationRecord sample_allocation(const std::string& id) {
  AllocationRecord r;
  r.id = id;
  r.owner = "alice";
  r.site = "demo";
  r.phase = "serving";
  r.job_url = "https://unicore.example.org/rest/core/jobs/" + id;
  r.job_id = id;
  r.working_dir = "https://unicore.example.org/rest/core/storages/" + id + "-uspace";
  r.queue = "batch";
  r.node = "compute1";
  r.agent_host = "10.0.0.2";
  r.agent_port = 40123;
  r.agent_hostname = "compute1";
  r.hub_ip = "127.0.0.1";
  r.ports = {50001, 50002, 50003, 50004, 50005};
  r.resources_json = R"({"nodes":1})";
  r.created_ms = 1000;
  r.updated_ms = 2000;
  r.link_secret_hex = std::string(64, 'a');
  r.jupyter_key = "jupyter-key-" + id;
  r.signature_scheme = "hmac-sha256";
  return r;
}

KernelRecord sample_kernel(const std::string& id, const std::string& allocation) {
  KernelRecord r;
  r.id = id;
  r.allocation_id = allocation;
  r.owner = "alice";
  r.site = "demo";
  r.state = "ready";
  r.end_cause = "none";
  r.reason = "";
  r.lease_s = 90;
  r.view_json = R"({"id":")" + id + R"("})";
  r.created_ms = 1000;
  r.updated_ms = 3000;
  return r;
}

mode_t mode_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

// Runs SQL on a file directly, as an operator's sqlite3 (or an older kernel-bridge) would.
void run_sql(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  char* error = nullptr;
  int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
  std::string message = error ? error : "";
  sqlite3_free(error);
  sqlite3_close(db);
  ASSERT_EQ(rc, SQLITE_OK) << message;
}

std::string error_of(const std::string& path, SqliteOptions options = {}) {
  try {
    open_sqlite_store(path, options);
  } catch (const StoreError& e) {
    return e.what();
  }
  return "";
}

TEST(SqliteStore, CreatesThePrivateDirectoryAndFile) {
  TempDir dir;
  const std::string state_dir = dir.file("state");
  auto opened = open_sqlite_store(state_dir + "/state.db");
  EXPECT_EQ(mode_of(state_dir), 0700u);
  EXPECT_EQ(mode_of(state_dir + "/state.db"), 0600u);
  EXPECT_EQ(opened.migrated_from, 0);
  EXPECT_TRUE(opened.moved_aside.empty());
  auto snap = opened.store->load();
  EXPECT_TRUE(snap.allocations.empty());
  EXPECT_TRUE(snap.kernels.empty());
  EXPECT_EQ(opened.store->where(), "sqlite " + state_dir + "/state.db");
}

TEST(SqliteStore, RecordsSurviveReopening) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  {
    auto opened = open_sqlite_store(path);
    opened.store->put(sample_allocation("a1"));
    opened.store->put(sample_allocation("a2"));
    opened.store->put(sample_kernel("k1", "a1"));
    opened.store->put(sample_kernel("k2", "a2"));
    auto changed = sample_kernel("k1", "a1");
    changed.state = "reconnecting";
    changed.reason = "link lost";
    opened.store->put(changed);  // replaces, by id
    auto moved = sample_allocation("a1");
    moved.agent_port = 40999;
    moved.phase = "connecting";
    opened.store->put(moved);
    opened.store->remove_allocation("a2");
    opened.store->remove_kernel("k2");
    opened.store->remove_kernel("never-there");
  }
  auto opened = open_sqlite_store(path);
  auto snap = opened.store->load();
  ASSERT_EQ(snap.allocations.size(), 1u);
  const auto& a = snap.allocations[0];
  const auto expected = sample_allocation("a1");
  EXPECT_EQ(a.id, "a1");
  EXPECT_EQ(a.phase, "connecting");
  EXPECT_EQ(a.agent_port, 40999);
  EXPECT_EQ(a.ports, expected.ports);
  EXPECT_EQ(a.job_url, expected.job_url);
  EXPECT_EQ(a.working_dir, expected.working_dir);
  EXPECT_EQ(a.resources_json, expected.resources_json);
  EXPECT_EQ(a.link_secret_hex, expected.link_secret_hex);
  EXPECT_EQ(a.jupyter_key, expected.jupyter_key);
  EXPECT_EQ(a.signature_scheme, "hmac-sha256");
  EXPECT_EQ(a.created_ms, 1000);
  ASSERT_EQ(snap.kernels.size(), 1u);
  EXPECT_EQ(snap.kernels[0].id, "k1");
  EXPECT_EQ(snap.kernels[0].state, "reconnecting");
  EXPECT_EQ(snap.kernels[0].reason, "link lost");
  EXPECT_EQ(snap.kernels[0].lease_s, 90);
  EXPECT_EQ(snap.kernels[0].view_json, sample_kernel("k1", "a1").view_json);
}

std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(SqliteStore, ARemovedAllocationsSecretsLeaveTheFiles) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  auto opened = open_sqlite_store(path);
  auto a = sample_allocation("a1");
  a.link_secret_hex = "5ec2e7" + std::string(58, '1');
  a.jupyter_key = "canary-jupyter-key-8d1f";
  opened.store->put(a);
  opened.store->put(sample_allocation("a2"));
  for (int i = 0; i < 20; ++i) opened.store->put(a);  // several page versions in the WAL
  EXPECT_NE((bytes_of(path) + bytes_of(path + "-wal")).find("canary-jupyter-key-8d1f"),
            std::string::npos);
  opened.store->remove_allocation("a1");
  for (const char* suffix : {"", "-wal", "-shm"}) {
    const std::string content = bytes_of(path + suffix);
    EXPECT_EQ(content.find("canary-jupyter-key-8d1f"), std::string::npos) << suffix;
    EXPECT_EQ(content.find(a.link_secret_hex), std::string::npos) << suffix;
  }
  EXPECT_EQ(opened.store->load().allocations.size(), 1u);
}

TEST(SqliteStore, SecretsAreNotInTheAllocationsTable) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  open_sqlite_store(path).store->put(sample_allocation("a1"));
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT * FROM allocations", -1, &stmt, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  for (int c = 0; c < sqlite3_column_count(stmt); ++c) {
    const auto* text = sqlite3_column_text(stmt, c);
    const std::string value = text ? reinterpret_cast<const char*>(text) : "";
    EXPECT_EQ(value.find("jupyter-key-"), std::string::npos) << sqlite3_column_name(stmt, c);
    EXPECT_NE(value, std::string(64, 'a')) << sqlite3_column_name(stmt, c);
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

// A file as schema 1 wrote it: the secrets were columns of allocations.
TEST(SqliteStore, MigratesASchemaOneFile) {
  TempDir dir;
  const std::string path = dir.write("state.db", "", 0600);
  std::filesystem::remove(path);
  run_sql(path, R"sql(
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
INSERT INTO allocations VALUES ('a1', 'bob', 'demo', 'serving', 'https://u/jobs/a1', 'a1',
  'https://u/storages/a1', 'batch', 'c1', '10.0.0.3', 40001, 'c1', '127.0.0.1', 1, 2, 3, 4, 5,
  '{}', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 'old-key',
  'hmac-sha256', 10, 20);
INSERT INTO kernels VALUES ('k1', 'a1', 'bob', 'demo', 'ready', 'none', '', 0, '{}', 10, 20);
PRAGMA user_version = 1;
)sql");
  ::chmod(path.c_str(), 0600);
  auto opened = open_sqlite_store(path);
  EXPECT_EQ(opened.migrated_from, 1);
  auto snap = opened.store->load();
  ASSERT_EQ(snap.allocations.size(), 1u);
  EXPECT_EQ(snap.allocations[0].owner, "bob");
  EXPECT_EQ(snap.allocations[0].agent_port, 40001);
  EXPECT_EQ(snap.allocations[0].ports, (std::array<std::uint16_t, 5>{1, 2, 3, 4, 5}));
  EXPECT_EQ(snap.allocations[0].link_secret_hex, std::string(64, 'b'));
  EXPECT_EQ(snap.allocations[0].jupyter_key, "old-key");
  ASSERT_EQ(snap.kernels.size(), 1u);
  EXPECT_EQ(snap.kernels[0].allocation_id, "a1");
  // Migrated once: the next open finds the current schema.
  opened.store.reset();
  EXPECT_EQ(open_sqlite_store(path).migrated_from, 0);
}

TEST(SqliteStore, RefusesAFileThatIsNotADatabase) {
  TempDir dir;
  const std::string path = dir.write("state.db", std::string(8192, 'x'), 0600);
  const std::string error = error_of(path);
  EXPECT_NE(error.find(path), std::string::npos) << error;
  EXPECT_NE(error.find("refuses to start"), std::string::npos) << error;
  EXPECT_NE(error.find("--start-empty"), std::string::npos) << error;
  // Refusing leaves the file as it was.
  EXPECT_EQ(std::filesystem::file_size(path), 8192u);
}

TEST(SqliteStore, RefusesACorruptDatabase) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  {
    auto opened = open_sqlite_store(path);
    for (int i = 0; i < 200; ++i) opened.store->put(sample_kernel("k" + std::to_string(i), "a"));
  }
  // Checkpointed into the main file on close; now overwrite every page but the first (the header
  // and the schema stay readable, the tables do not).
  const auto size = std::filesystem::file_size(path);
  ASSERT_GT(size, 3 * 4096u);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096);
    const std::string junk(size - 4096, '\xa5');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  const std::string error = error_of(path);
  EXPECT_NE(error.find(path), std::string::npos) << error;
  EXPECT_NE(error.find("refuses to start"), std::string::npos) << error;
}

TEST(SqliteStore, StartEmptyKeepsTheUnreadableFileAside) {
  TempDir dir;
  const std::string path = dir.write("state.db", "this is not sqlite", 0600);
  SqliteOptions options;
  options.start_empty_if_unreadable = true;
  auto opened = open_sqlite_store(path, options);
  ASSERT_FALSE(opened.moved_aside.empty());
  EXPECT_EQ(opened.moved_aside.rfind(path + ".unreadable-", 0), 0u) << opened.moved_aside;
  EXPECT_FALSE(opened.moved_reason.empty());
  std::ifstream kept(opened.moved_aside);
  std::string content((std::istreambuf_iterator<char>(kept)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "this is not sqlite");
  EXPECT_TRUE(opened.store->load().kernels.empty());
  opened.store->put(sample_kernel("k1", "a1"));
  EXPECT_EQ(opened.store->load().kernels.size(), 1u);
  EXPECT_EQ(mode_of(path), 0600u);
}

TEST(SqliteStore, RefusesAFileFromANewerVersion) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  open_sqlite_store(path);
  run_sql(path, "PRAGMA user_version = 99");
  const std::string error = error_of(path);
  EXPECT_NE(error.find("schema version 99"), std::string::npos) << error;
  EXPECT_NE(error.find("newer kernel-bridge"), std::string::npos) << error;
}

TEST(SqliteStore, RefusesAnotherProgramsDatabase) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  run_sql(path, "CREATE TABLE notes (text TEXT)");
  ::chmod(path.c_str(), 0600);
  const std::string error = error_of(path);
  EXPECT_NE(error.find("not kernel-bridge's"), std::string::npos) << error;
}

TEST(SqliteStore, RefusesAFileOthersMayRead) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  open_sqlite_store(path);
  ::chmod(path.c_str(), 0644);
  const std::string error = error_of(path);
  EXPECT_NE(error.find("0644"), std::string::npos) << error;
  EXPECT_NE(error.find("chmod 600"), std::string::npos) << error;
  // Not an unreadable file: --start-empty does not move it aside either.
  SqliteOptions options;
  options.start_empty_if_unreadable = true;
  EXPECT_FALSE(error_of(path, options).empty());
  EXPECT_TRUE(std::filesystem::exists(path));
}

TEST(SqliteStore, InspectionReadsWithoutCreatingOrMigrating) {
  TempDir dir;
  const std::string path = dir.file("state.db");
  auto absent = inspect_sqlite_store(path);
  EXPECT_FALSE(absent.exists);
  EXPECT_TRUE(absent.problem.empty()) << absent.problem;
  EXPECT_FALSE(std::filesystem::exists(path)) << "inspecting created the file";
  {
    auto opened = open_sqlite_store(path);
    opened.store->put(sample_allocation("a1"));
    opened.store->put(sample_kernel("k1", "a1"));
    auto ended = sample_kernel("k2", "");
    ended.state = "ended";
    opened.store->put(ended);
  }
  auto found = inspect_sqlite_store(path);
  EXPECT_TRUE(found.exists);
  EXPECT_TRUE(found.problem.empty()) << found.problem;
  EXPECT_EQ(found.schema_version, kSchemaVersion);
  EXPECT_EQ(found.allocations, 1);
  EXPECT_EQ(found.kernels, 2);
  EXPECT_EQ(found.live_kernels, 1);
  ::chmod(path.c_str(), 0640);
  EXPECT_NE(inspect_sqlite_store(path).problem.find("chmod 600"), std::string::npos);
  const std::string junk = dir.write("junk.db", std::string(4096, 'j'), 0600);
  EXPECT_FALSE(inspect_sqlite_store(junk).problem.empty());
}

}  // namespace
}  // namespace kb::store
