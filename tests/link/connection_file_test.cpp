// Tests link/connection_file.*: Jupyter connection files are validated field by field with
// errors naming the file and field, and written 0600 atomically.
#include "link/connection_file.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

namespace kb::tunnel {
namespace {

namespace fs = std::filesystem;

class ConnectionFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "kb-cf-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    std::string path = (fs::path(dir_) / name).string();
    std::ofstream(path) << text;
    return path;
  }

  static nlohmann::json valid() {
    return {{"ip", "127.0.0.1"},
            {"transport", "tcp"},
            {"shell_port", 5001},
            {"iopub_port", 5002},
            {"stdin_port", 5003},
            {"control_port", 5004},
            {"hb_port", 5005},
            {"key", "abc123"},
            {"signature_scheme", "hmac-sha256"},
            {"kernel_name", "python3"},
            {"jupyter_session", "/x.ipynb"}};
  }

  // The error message parse_connection_info gives for `j`, or "" if it accepts it.
  static std::string error_for(const nlohmann::json& j, ParseOptions options = {}) {
    try {
      parse_connection_info(j, "/path/kernel-1.json", options);
    } catch (const ConnectionFileError& e) {
      return e.what();
    }
    return "";
  }

  std::string dir_;
};

TEST_F(ConnectionFileTest, ReadsEveryField) {
  std::string path = write("k.json", valid().dump());
  ConnectionInfo info = read_connection_file(path);
  EXPECT_EQ(info.ip, "127.0.0.1");
  EXPECT_EQ(info.transport, "tcp");
  EXPECT_EQ(info.port(ChannelKind::shell), 5001);
  EXPECT_EQ(info.port(ChannelKind::iopub), 5002);
  EXPECT_EQ(info.port(ChannelKind::stdin_), 5003);
  EXPECT_EQ(info.port(ChannelKind::control), 5004);
  EXPECT_EQ(info.port(ChannelKind::hb), 5005);
  EXPECT_EQ(info.key, "abc123");
  EXPECT_EQ(info.signature_scheme, "hmac-sha256");
  EXPECT_EQ(info.kernel_name, "python3");
  EXPECT_EQ(info.extra.at("jupyter_session"), "/x.ipynb");
}

TEST_F(ConnectionFileTest, MissingFieldsAreNamed) {
  for (const char* field :
       {"shell_port", "iopub_port", "stdin_port", "control_port", "hb_port", "key"}) {
    auto j = valid();
    j.erase(field);
    std::string err = error_for(j);
    EXPECT_NE(err.find("/path/kernel-1.json"), std::string::npos) << err;
    EXPECT_NE(err.find(std::string("missing field \"") + field + "\""), std::string::npos) << err;
  }
}

TEST_F(ConnectionFileTest, OptionalFieldsTakeJupyterDefaults) {
  auto j = valid();
  j.erase("transport");
  j.erase("signature_scheme");
  j.erase("kernel_name");
  j.erase("ip");
  ConnectionInfo info = parse_connection_info(j, "x");
  EXPECT_EQ(info.transport, "tcp");
  EXPECT_EQ(info.signature_scheme, "hmac-sha256");
  EXPECT_EQ(info.ip, "127.0.0.1");
  EXPECT_EQ(info.kernel_name, "");
}

TEST_F(ConnectionFileTest, BadPortsAreRefusedWithTheField) {
  auto j = valid();
  j["iopub_port"] = 70000;
  EXPECT_NE(error_for(j).find("\"iopub_port\" is 70000, not a TCP port"), std::string::npos)
      << error_for(j);
  j["iopub_port"] = -1;
  EXPECT_NE(error_for(j).find("iopub_port"), std::string::npos);
  j["iopub_port"] = "5002";
  EXPECT_NE(error_for(j).find("\"iopub_port\" must be an integer"), std::string::npos);
  j["iopub_port"] = 5001;  // same as shell
  EXPECT_NE(error_for(j).find("repeats port 5001"), std::string::npos) << error_for(j);
}

TEST_F(ConnectionFileTest, ZeroPortsOnlyWhereAllowed) {
  auto j = valid();
  j["hb_port"] = 0;
  j["shell_port"] = 0;
  EXPECT_NE(error_for(j).find("\"shell_port\" is 0"), std::string::npos) << error_for(j);
  EXPECT_EQ(error_for(j, ParseOptions{.allow_zero_ports = true}), "");
}

TEST_F(ConnectionFileTest, IpcTransportIsRefusedAndSaysSo) {
  auto j = valid();
  j["transport"] = "ipc";
  std::string err = error_for(j);
  EXPECT_NE(err.find("\"ipc\""), std::string::npos) << err;
  EXPECT_NE(err.find("not supported"), std::string::npos) << err;
  EXPECT_NE(err.find("\"transport\": \"tcp\""), std::string::npos) << err;
  j["transport"] = "udp";
  EXPECT_NE(error_for(j).find("only \"tcp\""), std::string::npos);
}

TEST_F(ConnectionFileTest, WrongTypesAndSchemesAreRefused) {
  auto j = valid();
  j["key"] = 12;
  EXPECT_NE(error_for(j).find("\"key\" must be a string"), std::string::npos);
  j = valid();
  j["signature_scheme"] = "md5";
  EXPECT_NE(error_for(j).find("signature_scheme"), std::string::npos);
  j["signature_scheme"] = "hmac-sha512";
  EXPECT_EQ(error_for(j), "");
  EXPECT_NE(error_for(nlohmann::json::array()).find("JSON object"), std::string::npos);
}

TEST_F(ConnectionFileTest, UnreadableOrInvalidFilesNameThePath) {
  std::string missing = (fs::path(dir_) / "nope.json").string();
  try {
    read_connection_file(missing);
    FAIL() << "a missing file was accepted";
  } catch (const ConnectionFileError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  std::string bad = write("bad.json", "{\"ip\": ");
  try {
    read_connection_file(bad);
    FAIL() << "invalid JSON was accepted";
  } catch (const ConnectionFileError& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("not valid JSON"), std::string::npos);
  }
}

TEST_F(ConnectionFileTest, WritesMode0600AndRoundTrips) {
  ::mode_t old = ::umask(0);  // a permissive umask must not widen the file's mode
  ConnectionInfo info = parse_connection_info(valid(), "x");
  info.key = "secret-key";
  std::string path = (fs::path(dir_) / "out.json").string();
  write_connection_file(path, info);
  ::umask(old);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ConnectionInfo back = read_connection_file(path);
  EXPECT_EQ(back.key, "secret-key");
  EXPECT_EQ(back.ports, info.ports);
  EXPECT_EQ(back.extra.at("jupyter_session"), "/x.ipynb");
  // Rewriting replaces the file (atomic rename), leaving no temporary behind.
  info.port(ChannelKind::hb) = 6000;
  write_connection_file(path, info);
  EXPECT_EQ(read_connection_file(path).port(ChannelKind::hb), 6000);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 1u);
}

TEST_F(ConnectionFileTest, WriteIntoMissingDirectoryNamesThePath) {
  std::string path = (fs::path(dir_) / "no" / "such" / "k.json").string();
  try {
    write_connection_file(path, parse_connection_info(valid(), "x"));
    FAIL() << "write into a missing directory succeeded";
  } catch (const ConnectionFileError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST_F(ConnectionFileTest, ChoosesFiveDistinctFreePorts) {
  auto ports = choose_free_ports();
  std::set<std::uint16_t> distinct(ports.begin(), ports.end());
  EXPECT_EQ(distinct.size(), kChannelKinds);
  EXPECT_EQ(distinct.count(0), 0u);
}

}  // namespace
}  // namespace kb::tunnel

namespace kb::tunnel {
namespace {

// Binds 127.0.0.1:port (optionally with SO_REUSEADDR) and listens; returns 0 or the errno.
int try_listen(std::uint16_t port, bool reuse) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor a(io);
  boost::system::error_code ec;
  a.open(boost::asio::ip::tcp::v4(), ec);
  if (reuse) a.set_option(boost::asio::socket_base::reuse_address(true), ec);
  a.bind({boost::asio::ip::address_v4::loopback(), port}, ec);
  if (!ec) a.listen(16, ec);
  return ec.value();
}

TEST(PortReservation, HeldPortsAreTakenByNobodyButAReuseAddrKernel) {
  PortReservation r = PortReservation::reserve();
  std::set<std::uint16_t> distinct(r.ports().begin(), r.ports().end());
  EXPECT_EQ(distinct.size(), kChannelKinds);
  for (auto port : r.ports()) {
    // Another process choosing "free" ports the naive way cannot take it...
    EXPECT_EQ(try_listen(port, false), EADDRINUSE) << port;
    // ...but the kernel, binding with SO_REUSEADDR like ZeroMQ, can.
    EXPECT_EQ(try_listen(port, true), 0) << port;
  }
  auto ports = r.ports();
  r.release();
  EXPECT_EQ(try_listen(ports[0], false), 0);
}

}  // namespace
}  // namespace kb::tunnel
