// The ControlApi facade (bridge/control_api.hpp): construction (the kernels gauge), start() (the
// tokens, the Unix socket's path and mode, the listeners), reload_tokens(), stop(). Connections
// are in http_session.cpp, routes in api_routes.cpp and api_create_kernel.cpp.
#include "bridge/control_api.hpp"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/beast/core/error.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>

#include "bridge/control_api_impl.hpp"

namespace kb::bridge {

namespace net = boost::asio;
namespace beast = boost::beast;

ControlApi::ControlApi(net::io_context& io, const BridgeConfig& config, KernelService& kernels,
                       auth::CredentialsStore& credentials, BridgeMetrics& metrics)
    : impl_(std::make_shared<Impl>(io, config, kernels, credentials, metrics)) {
  // kb_kernels{state} is computed at scrape time from the service (scrapes run on the io thread).
  std::weak_ptr<Impl> weak = impl_;
  metrics.registry.add_collector([weak] {
    auto impl = weak.lock();
    if (!impl) return;
    std::map<KernelState, int> counts;
    for (const auto& v : impl->kernels.list()) counts[v.state]++;
    for (auto s : kAllKernelStates)
      impl->metrics.kernels.with({std::string(to_string(s))}).set(counts[s]);
  });
  metrics.up_since.unlabelled().set(
      std::chrono::duration<double>(Clock::now().time_since_epoch()).count());
}

ControlApi::~ControlApi() {
  stop();
}

std::optional<net::ip::tcp::endpoint> ControlApi::tcp_endpoint() const {
  if (!impl_->tcp_acceptor) return std::nullopt;
  beast::error_code ec;
  auto ep = impl_->tcp_acceptor->local_endpoint(ec);
  if (ec) return std::nullopt;
  return ep;
}

void ControlApi::handle(const Peer& peer, HttpRequest request,
                        std::function<void(HttpResponse)> done) {
  impl_->handle(peer, std::move(request), std::move(done));
}

namespace {

// Prepares the socket's path: creates the directory (0755) if missing, removes a stale socket,
// refuses to replace anything else or a socket someone still listens on.
void prepare_socket_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    throw std::runtime_error("api.unix_socket " + path + " is too long for a Unix socket (max " +
                             std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) +
                             " bytes); choose a shorter path");
  }
  const fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  if (!dir.empty() && !fs::exists(dir, ec)) {
    fs::create_directories(dir, ec);
    if (ec)
      throw std::runtime_error("cannot create the directory of api.unix_socket " + dir.string() +
                               ": " + ec.message());
    ::chmod(dir.c_str(), 0755);
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;  // nothing there
  if (!S_ISSOCK(st.st_mode)) {
    throw std::runtime_error("api.unix_socket " + path +
                             " exists and is not a socket; remove it or choose another path");
  }
  net::io_context probe_io;
  net::local::stream_protocol::socket probe(probe_io);
  boost::system::error_code connect_error;
  probe.connect(net::local::stream_protocol::endpoint(path), connect_error);
  if (!connect_error) {
    throw std::runtime_error(
        "another process is listening on api.unix_socket " + path +
        " (is a kernel-bridge already running?); stop it or choose another path");
  }
  if (::unlink(path.c_str()) != 0) {
    throw std::runtime_error("cannot remove the stale socket " + path + ": " +
                             std::strerror(errno));
  }
  spdlog::info("api: removed stale socket {}", path);
}

}  // namespace

std::string ControlApi::reload_tokens() {
  Impl& impl = *impl_;
  const std::string& path = impl.config.api.tokens_file;
  if (path.empty()) return {};
  try {
    impl.tokens = auth::ApiTokens::load(path);
  } catch (const std::exception& e) {
    spdlog::error("api: {} not reloaded, the tokens loaded before stay in use: {}", path, e.what());
    return e.what();
  }
  spdlog::info("api: tokens reloaded from {}", path);
  return {};
}

void ControlApi::start() {
  Impl& impl = *impl_;
  const ApiConfig& api = impl.config.api;
  impl.stopped = false;
  if (!api.tokens_file.empty()) impl.tokens = auth::ApiTokens::load(api.tokens_file);
  impl.lookups = std::make_unique<net::thread_pool>(1);
  if (!api.unix_socket.empty()) {
    prepare_socket_path(api.unix_socket);
    impl.unix_acceptor.emplace(impl.io);
    net::local::stream_protocol::endpoint endpoint(api.unix_socket);
    boost::system::error_code ec;
    impl.unix_acceptor->open(endpoint.protocol(), ec);
    if (!ec) impl.unix_acceptor->bind(endpoint, ec);
    if (ec)
      throw std::runtime_error("cannot bind api.unix_socket " + api.unix_socket + ": " +
                               ec.message());
    impl.socket_path = api.unix_socket;
    // Everyone may connect: SO_PEERCRED tells us who they are, and they see only their kernels.
    if (::chmod(api.unix_socket.c_str(), 0666) != 0) {
      throw std::runtime_error("cannot chmod 0666 api.unix_socket " + api.unix_socket + ": " +
                               std::strerror(errno));
    }
    impl.unix_acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("cannot listen on api.unix_socket " + api.unix_socket + ": " +
                               ec.message());
    spdlog::info("api: listening on unix socket {}", api.unix_socket);
    impl.accept_unix();
  }
  if (api.tcp) {
    boost::system::error_code ec;
    auto address = net::ip::make_address(api.tcp->host, ec);
    if (ec) {
      throw std::runtime_error(
          "api.tcp host " + api.tcp->host +
          " is not an IP address; write the address to listen on, e.g. 127.0.0.1:8765");
    }
    net::ip::tcp::endpoint endpoint(address, api.tcp->port);
    impl.tcp_acceptor.emplace(impl.io);
    impl.tcp_acceptor->open(endpoint.protocol(), ec);
    if (!ec) impl.tcp_acceptor->set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) impl.tcp_acceptor->bind(endpoint, ec);
    if (!ec) impl.tcp_acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("cannot listen on api.tcp " + api.tcp->str() + ": " + ec.message());
    spdlog::info("api: listening on tcp {} ({} tokens)",
                 endpoint.address().to_string() + ":" +
                     std::to_string(impl.tcp_acceptor->local_endpoint().port()),
                 impl.tokens ? impl.tokens->size() : 0);
    impl.accept_tcp();
  }
}

void ControlApi::stop() {
  Impl& impl = *impl_;
  if (impl.stopped) return;
  impl.stopped = true;
  boost::system::error_code ignored;
  if (impl.unix_acceptor) impl.unix_acceptor->close(ignored);
  if (impl.tcp_acceptor) impl.tcp_acceptor->close(ignored);
  if (!impl.socket_path.empty()) {
    ::unlink(impl.socket_path.c_str());
    impl.socket_path.clear();
  }
  for (auto& [key, weak] : impl.sessions) {
    if (auto session = weak.lock()) session->close();
  }
  impl.sessions.clear();
  auto waits = impl.waits;
  for (auto& [key, timer] : waits) timer->cancel();
  if (impl.lookups) {
    impl.lookups->join();
    impl.lookups.reset();
  }
}

}  // namespace kb::bridge
