#include "bridge/process_handover.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

namespace kb::bridge {

namespace {

using nlohmann::json;
constexpr const char* kDocumentName = "kb-handover";
constexpr const char* kFdPrefix = "kb-fd-";
constexpr const char* kFormat = "kernel-bridge-handover";
constexpr int kVersion = 1;

std::optional<tunnel::ChannelKind> kind_from(const std::string& name) {
  for (auto kind : tunnel::kAllChannelKinds) {
    if (name == tunnel::to_string(kind)) return kind;
  }
  return std::nullopt;
}

// sd_notify(3) with descriptors: one datagram to $NOTIFY_SOCKET.
bool send_notify(const std::string& text, const int* fds, std::size_t count) {
  const char* env = std::getenv("NOTIFY_SOCKET");
  if (env == nullptr || (env[0] != '/' && env[0] != '@')) return false;
  const std::string path = env;
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) return false;
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (path[0] == '@') addr.sun_path[0] = '\0';  // abstract namespace
  const int s = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return false;
  iovec iov{const_cast<char*>(text.data()), text.size()};
  msghdr msg{};
  msg.msg_name = &addr;
  msg.msg_namelen = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (count > 0) {
    control.resize(CMSG_SPACE(sizeof(int) * count));
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * count);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * count);
  }
  const bool ok = ::sendmsg(s, &msg, MSG_NOSIGNAL) >= 0;
  ::close(s);
  return ok;
}

// The document in an anonymous memory file (never on disk).
int document_fd(const std::string& document, std::string& error) {
  const int fd = ::memfd_create(kDocumentName, MFD_CLOEXEC);
  if (fd < 0) {
    error = std::string("memfd_create: ") + std::strerror(errno);
    return -1;
  }
  std::size_t off = 0;
  while (off < document.size()) {
    const ssize_t n = ::write(fd, document.data() + off, document.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = std::string("writing the handover document: ") + std::strerror(errno);
      ::close(fd);
      return -1;
    }
    off += static_cast<std::size_t>(n);
  }
  return fd;
}

std::string read_document(int fd) {
  std::string out;
  char buf[65536];
  off_t off = 0;
  for (;;) {
    const ssize_t n = ::pread(fd, buf, sizeof(buf), off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::runtime_error(std::string("cannot read it: ") + std::strerror(errno));
    if (n == 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
    off += n;
    if (out.size() > (64u << 20)) throw std::runtime_error("it is larger than 64 MiB");
  }
}

}  // namespace

HandoverPackage encode_handover(const std::vector<HandedOver>& kernels) {
  HandoverPackage package;
  auto add = [&package](int fd) {
    package.fds.push_back(fd);
    return static_cast<int>(package.fds.size() - 1);
  };
  json list = json::array();
  for (const auto& k : kernels) {
    json listeners = json::array();
    for (int fd : k.link.listeners) listeners.push_back(add(fd));
    const auto& l = k.link.link;
    json streams = json::array();
    for (const auto& st : l.streams) {
      streams.push_back({{"id", st.id},
                         {"kind", tunnel::to_string(st.kind)},
                         {"credit", st.credit},
                         {"credit_to_return", st.credit_to_return},
                         {"read_eof", st.read_eof},
                         {"peer_fin", st.peer_fin},
                         {"shut_down", st.shut_down},
                         {"fd", add(st.fd)}});
    }
    list.push_back({{"allocation", k.allocation_id},
                    {"listeners", std::move(listeners)},
                    {"link",
                     {{"self", l.self_id},
                      {"peer", l.peer_id},
                      {"peer_window", l.peer_window},
                      {"next_seq", l.next_seq},
                      {"last_received", l.last_received},
                      {"next_stream_id", l.next_stream_id},
                      {"streams", std::move(streams)}}}});
  }
  package.document =
      json{{"format", kFormat}, {"version", kVersion}, {"kernels", std::move(list)}}.dump();
  return package;
}

std::vector<HandedOver> decode_handover(const std::string& document, const std::vector<int>& fds) {
  const json doc = json::parse(document, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || doc.value("format", "") != kFormat) {
    throw std::runtime_error("it is not a kernel-bridge handover document");
  }
  if (doc.value("version", 0) != kVersion) {
    throw std::runtime_error("its version " + doc.value("version", json()).dump() +
                             " is not the one this kernel-bridge reads (" +
                             std::to_string(kVersion) + ")");
  }
  std::set<int> used;
  auto fd_at = [&](const json& index) {
    const int i = index.get<int>();
    if (i < 0 || static_cast<std::size_t>(i) >= fds.size() || fds[i] < 0) {
      throw std::runtime_error("descriptor " + std::to_string(i) + " did not arrive");
    }
    if (!used.insert(i).second) {
      throw std::runtime_error("descriptor " + std::to_string(i) + " is named twice");
    }
    return fds[i];
  };
  std::vector<HandedOver> out;
  try {
    for (const auto& k : doc.at("kernels")) {
      HandedOver h;
      h.allocation_id = k.at("allocation").get<std::string>();
      const auto& listeners = k.at("listeners");
      if (!listeners.is_array() || listeners.size() != tunnel::kChannelKinds) {
        throw std::runtime_error("kernel " + h.allocation_id + " has not five listeners");
      }
      for (std::size_t i = 0; i < tunnel::kChannelKinds; ++i) {
        h.link.listeners[i] = fd_at(listeners[i]);
      }
      const auto& l = k.at("link");
      auto& link = h.link.link;
      link.self_id = l.at("self").get<std::string>();
      link.peer_id = l.at("peer").get<std::string>();
      link.peer_window = l.at("peer_window").get<std::uint32_t>();
      link.next_seq = l.at("next_seq").get<std::uint64_t>();
      link.last_received = l.at("last_received").get<std::uint64_t>();
      link.next_stream_id = l.at("next_stream_id").get<std::uint32_t>();
      for (const auto& st : l.at("streams")) {
        tunnel::LinkHandover::Stream s;
        s.id = st.at("id").get<std::uint32_t>();
        auto kind = kind_from(st.at("kind").get<std::string>());
        if (!kind) throw std::runtime_error("unknown channel " + st.at("kind").dump());
        s.kind = *kind;
        s.credit = st.at("credit").get<std::uint64_t>();
        s.credit_to_return = st.at("credit_to_return").get<std::uint64_t>();
        s.read_eof = st.at("read_eof").get<bool>();
        s.peer_fin = st.at("peer_fin").get<bool>();
        s.shut_down = st.at("shut_down").get<bool>();
        s.fd = fd_at(st.at("fd"));
        link.streams.push_back(s);
      }
      out.push_back(std::move(h));
    }
  } catch (const json::exception& e) {
    throw std::runtime_error(std::string("it is malformed: ") + e.what());
  }
  return out;
}

bool service_manager_present() {
  const char* env = std::getenv("NOTIFY_SOCKET");
  return env != nullptr && (env[0] == '/' || env[0] == '@');
}

bool notify_service_manager(const std::string& state) {
  return send_notify(state, nullptr, 0);
}

bool push_to_fdstore(const HandoverPackage& package, std::string& error) {
  if (!service_manager_present()) {
    error = "no service manager (NOTIFY_SOCKET is not set)";
    return false;
  }
  for (std::size_t i = 0; i < package.fds.size(); ++i) {
    const std::string text = "FDSTORE=1\nFDNAME=" + std::string(kFdPrefix) + std::to_string(i);
    if (!send_notify(text, &package.fds[i], 1)) {
      error = "sd_notify FDSTORE: " + std::string(std::strerror(errno));
      return false;
    }
  }
  // The document last: a store that filled up on the way has no document, and the next process
  // then re-attaches everything the ordinary way instead of trusting a partial set.
  const int doc = document_fd(package.document, error);
  if (doc < 0) return false;
  const bool ok = send_notify("FDSTORE=1\nFDNAME=" + std::string(kDocumentName), &doc, 1);
  if (!ok) error = "sd_notify FDSTORE: " + std::string(std::strerror(errno));
  ::close(doc);
  return ok;
}

ExecSelf exec_self_now() {
  ExecSelf self;
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) self.path = exe.string();
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string arg;
  while (std::getline(in, arg, '\0')) self.argv.push_back(arg);
  return self;
}

void reexec_with(const ExecSelf& self, const HandoverPackage& package, std::string& error) {
  if (self.path.empty() || self.argv.empty() || ::access(self.path.c_str(), X_OK) != 0) {
    error = "cannot execute " + (self.path.empty() ? std::string("this program") : self.path) +
            " again";
    return;
  }
  std::vector<int> fds = package.fds;
  const int doc = document_fd(package.document, error);
  if (doc < 0) return;
  fds.push_back(doc);
  const int n = static_cast<int>(fds.size());
  // Move the descriptors to 3.. (the convention), via copies above that range.
  std::vector<int> high(fds.size());
  for (int i = 0; i < n; ++i) {
    high[i] = ::fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + n);
    if (high[i] < 0) {
      error = std::string("cannot duplicate a descriptor: ") + std::strerror(errno);
      return;
    }
  }
  std::string names;
  for (int i = 0; i < n; ++i) {
    if (::dup2(high[i], 3 + i) < 0) {  // dup2 clears close-on-exec on the copy
      error = std::string("dup2: ") + std::strerror(errno);
      return;
    }
    if (i > 0) names += ':';
    names += i + 1 < n ? std::string(kFdPrefix) + std::to_string(i) : std::string(kDocumentName);
  }
  // Everything else closes on exec.
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    const int fd = std::atoi(entry.path().filename().c_str());
    if (fd >= 3 + n) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  }
  ::setenv("LISTEN_FDS", std::to_string(n).c_str(), 1);
  ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
  ::setenv("LISTEN_FDNAMES", names.c_str(), 1);
  std::vector<char*> argv;
  for (const auto& a : self.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  ::execv(self.path.c_str(), argv.data());
  error = "execv " + self.path + ": " + std::strerror(errno);
}

std::vector<HandedOver> receive_handover(std::string& error) {
  const char* pid = std::getenv("LISTEN_PID");
  const char* count = std::getenv("LISTEN_FDS");
  const char* names_env = std::getenv("LISTEN_FDNAMES");
  if (pid == nullptr || count == nullptr) return {};
  const bool ours = std::atol(pid) == static_cast<long>(::getpid());
  const int n = ours ? std::atoi(count) : 0;
  std::vector<std::string> names;
  if (names_env != nullptr) {
    std::string all = names_env;
    std::size_t start = 0;
    for (;;) {
      auto colon = all.find(':', start);
      names.push_back(all.substr(start, colon - start));
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
  }
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  if (n <= 0) return {};

  int doc = -1;
  std::vector<int> indexed;  // kb-fd-<i> at i
  std::vector<int> others;
  for (int i = 0; i < n; ++i) {
    const int fd = 3 + i;
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    const std::string name = i < static_cast<int>(names.size()) ? names[i] : std::string();
    if (name == kDocumentName) {
      doc = fd;
    } else if (name.rfind(kFdPrefix, 0) == 0) {
      const long index = std::strtol(name.c_str() + std::strlen(kFdPrefix), nullptr, 10);
      if (index < 0 || index > 1 << 20) {
        others.push_back(fd);
        continue;
      }
      if (indexed.size() <= static_cast<std::size_t>(index)) indexed.resize(index + 1, -1);
      if (indexed[index] >= 0) others.push_back(indexed[index]);
      indexed[index] = fd;
    } else {
      others.push_back(fd);
    }
    // Out of the store at once: a connection this process closes must really close.
    if (!name.empty() && service_manager_present()) {
      send_notify("FDSTOREREMOVE=1\nFDNAME=" + name, nullptr, 0);
    }
  }
  for (int fd : others) ::close(fd);
  if (!others.empty()) {
    spdlog::warn("{} inherited descriptor(s) that are not kernel-bridge's were closed",
                 others.size());
  }
  std::vector<HandedOver> out;
  try {
    if (doc < 0) throw std::runtime_error("its document did not arrive");
    out = decode_handover(read_document(doc), indexed);
  } catch (const std::exception& e) {
    error = std::string("the previous process's handover cannot be used: ") + e.what() + "; " +
            std::to_string(indexed.size()) +
            " descriptor(s) closed, the kernels re-attach with new link sessions";
    for (int fd : indexed) {
      if (fd >= 0) ::close(fd);
    }
    if (doc >= 0) ::close(doc);
    return {};
  }
  ::close(doc);
  // Descriptors the document does not name.
  std::set<int> named;
  for (const auto& h : out) {
    for (int fd : h.link.listeners) named.insert(fd);
    for (const auto& st : h.link.link.streams) named.insert(st.fd);
  }
  for (int fd : indexed) {
    if (fd >= 0 && !named.count(fd)) ::close(fd);
  }
  return out;
}

}  // namespace kb::bridge
