#include "link/connection_file.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "common/files.hpp"

namespace kb::tunnel {

namespace {

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw ConnectionFileError("connection file " + source + ": " + what);
}

std::string optional_string(const nlohmann::json& j, const char* field, const std::string& source,
                            const std::string& fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) fail(source, std::string("field \"") + field + "\" must be a string");
  return it->get<std::string>();
}

bool valid_scheme(const std::string& scheme) {
  // jupyter_client accepts "hmac-" followed by any hashlib digest name (sha256, sha512, ...).
  if (scheme.rfind("hmac-", 0) != 0 || scheme.size() == 5) return false;
  for (char c : scheme.substr(5)) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  }
  return true;
}

}  // namespace

const char* port_field(ChannelKind kind) {
  switch (kind) {
    case ChannelKind::shell:
      return "shell_port";
    case ChannelKind::iopub:
      return "iopub_port";
    case ChannelKind::stdin_:
      return "stdin_port";
    case ChannelKind::control:
      return "control_port";
    case ChannelKind::hb:
      return "hb_port";
  }
  return "unknown_port";
}

nlohmann::json ConnectionInfo::to_json() const {
  nlohmann::json j = extra.is_object() ? extra : nlohmann::json::object();
  j["ip"] = ip;
  j["transport"] = transport;
  for (ChannelKind kind : kAllChannelKinds) j[port_field(kind)] = port(kind);
  j["key"] = key;
  j["signature_scheme"] = signature_scheme;
  j["kernel_name"] = kernel_name;
  return j;
}

ConnectionInfo parse_connection_info(const nlohmann::json& j, const std::string& source,
                                     ParseOptions options) {
  if (!j.is_object()) fail(source, "must hold a JSON object (a Jupyter connection file)");
  ConnectionInfo info;
  info.transport = optional_string(j, "transport", source, "tcp");
  if (info.transport == "ipc") {
    fail(source,
         "transport \"ipc\" (Unix domain sockets) is not supported: kernel-bridge relays TCP "
         "connections only; write the connection file with \"transport\": \"tcp\"");
  }
  if (info.transport != "tcp") {
    fail(source, "field \"transport\" is \"" + info.transport + "\"; only \"tcp\" is supported");
  }
  info.ip = optional_string(j, "ip", source, "127.0.0.1");
  if (info.ip.empty()) fail(source, "field \"ip\" is empty; use an address such as 127.0.0.1");

  std::set<int> seen;
  for (ChannelKind kind : kAllChannelKinds) {
    const char* field = port_field(kind);
    auto it = j.find(field);
    if (it == j.end()) fail(source, std::string("missing field \"") + field + "\"");
    if (!it->is_number_integer()) {
      fail(source, std::string("field \"") + field + "\" must be an integer port number, not " +
                       it->dump());
    }
    auto value = it->get<long long>();
    if (value < 0 || value > 65535) {
      fail(source, std::string("field \"") + field + "\" is " + std::to_string(value) +
                       ", not a TCP port (0-65535)");
    }
    if (value == 0 && !options.allow_zero_ports) {
      fail(source, std::string("field \"") + field + "\" is 0; a kernel needs a real port");
    }
    if (value != 0 && !seen.insert(static_cast<int>(value)).second) {
      fail(source, std::string("field \"") + field + "\" repeats port " + std::to_string(value) +
                       "; every channel needs its own port");
    }
    info.port(kind) = static_cast<std::uint16_t>(value);
  }

  auto key = j.find("key");
  if (key == j.end()) fail(source, "missing field \"key\" (the Jupyter message signing key)");
  if (!key->is_string()) fail(source, "field \"key\" must be a string");
  info.key = key->get<std::string>();

  info.signature_scheme = optional_string(j, "signature_scheme", source, "hmac-sha256");
  if (!valid_scheme(info.signature_scheme)) {
    fail(source, "field \"signature_scheme\" is \"" + info.signature_scheme +
                     "\"; expected hmac-<digest>, e.g. hmac-sha256");
  }
  info.kernel_name = optional_string(j, "kernel_name", source, "");

  for (auto it = j.begin(); it != j.end(); ++it) {
    static const std::set<std::string> known{
        "ip",           "transport", "shell_port", "iopub_port",       "stdin_port",
        "control_port", "hb_port",   "key",        "signature_scheme", "kernel_name"};
    if (!known.count(it.key())) info.extra[it.key()] = it.value();
  }
  return info;
}

ConnectionInfo read_connection_file(const std::string& path, ParseOptions options) {
  std::string content;
  try {
    content = read_small_file(path, 64 * 1024);  // Jupyter writes a few hundred bytes
  } catch (const FileReadError& e) {
    throw ConnectionFileError("cannot read connection file " + path + ": " + e.reason());
  }
  nlohmann::json j = nlohmann::json::parse(content, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail(path, "is not valid JSON");
  return parse_connection_info(j, path, options);
}

void write_file_atomic(const std::string& path, const std::string& content, unsigned mode) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  ::unlink(tmp.c_str());  // a leftover of a crashed earlier run with our pid
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    throw ConnectionFileError("cannot create " + tmp + ": " + std::strerror(errno) +
                              " (is the directory writable?)");
  }
  // The umask may have narrowed the mode; make it exactly what was asked.
  bool ok = ::fchmod(fd, mode) == 0;
  std::size_t done = 0;
  while (ok && done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ok = false;
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  int err = ok ? 0 : errno;
  if (::close(fd) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && ::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    throw ConnectionFileError("cannot write " + path + ": " + std::strerror(err));
  }
}

void write_connection_file(const std::string& path, const ConnectionInfo& info) {
  write_file_atomic(path, info.to_json().dump(2) + "\n", 0600);
}

std::array<std::uint16_t, kChannelKinds> choose_free_ports() {
  namespace ip = boost::asio::ip;
  boost::asio::io_context io;
  std::vector<ip::tcp::acceptor> held;
  std::array<std::uint16_t, kChannelKinds> ports{};
  for (std::size_t i = 0; i < kChannelKinds; ++i) {
    ip::tcp::acceptor acceptor(io);
    boost::system::error_code ec;
    acceptor.open(ip::tcp::v4(), ec);
    if (!ec) acceptor.bind({ip::address_v4::loopback(), 0}, ec);
    if (ec) {
      throw ConnectionFileError("cannot find a free TCP port on 127.0.0.1: " + ec.message());
    }
    ports[i] = acceptor.local_endpoint().port();
    held.push_back(std::move(acceptor));
  }
  return ports;
}

PortReservation PortReservation::reserve() {
  PortReservation r;
  for (std::size_t i = 0; i < kChannelKinds; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      throw ConnectionFileError(std::string("cannot reserve a port on 127.0.0.1: socket: ") +
                                std::strerror(errno));
    }
    r.fds_[i] = fd;
    int one = 1;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof addr;
    if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      throw ConnectionFileError(std::string("cannot reserve a port on 127.0.0.1: ") +
                                std::strerror(errno));
    }
    r.ports_[i] = ntohs(addr.sin_port);
  }
  return r;
}

PortReservation::PortReservation(PortReservation&& other) noexcept
    : ports_(other.ports_), fds_(other.fds_) {
  other.fds_.fill(-1);
}

PortReservation& PortReservation::operator=(PortReservation&& other) noexcept {
  if (this != &other) {
    release();
    ports_ = other.ports_;
    fds_ = other.fds_;
    other.fds_.fill(-1);
  }
  return *this;
}

void PortReservation::release() {
  for (int& fd : fds_) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
}

}  // namespace kb::tunnel
