// libFuzzer target: whole HTTP requests into the control API's real router (bridge/api_routes.cpp
// behind bridge/control_api.hpp), parsed by the same Beast parser and limits a connection uses,
// from one of four callers chosen by the first byte (a Unix user, an admin on the Unix socket, a
// uid without a name, a TCP client without a token). The service behind it is the tests' in-memory
// fake. Invariants: no exception leaves ControlApi::handle, every request gets exactly one answer
// whose JSON body serialises, no sanitizer report.
#include <spdlog/spdlog.h>

#include <boost/asio/io_context.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "bridge/control_api.hpp"
#include "tests/bridge/fake_kernel_service.hpp"

namespace {

namespace http = boost::beast::http;
using namespace kb::bridge;

const BridgeConfig& fuzz_config() {
  static const BridgeConfig config = [] {
    LoadOptions options;
    options.check_files = false;
    return parse_config(
        "[bridge]\nstate_dir = \"/nonexistent\"\nmax_kernels_per_user = 3\n"
        "[api]\nunix_socket = \"/nonexistent/api.sock\"\nadmin_users = [\"hub\"]\n"
        "max_body = \"64K\"\nmax_wait = \"1s\"\n"
        "[[site]]\nname = \"demo\"\nunicore_url = \"https://u.example/DEMO/rest/core\"\n"
        "login_hosts = [\"login\"]\nknown_hosts = \"/k\"\nssh_user = \"kb\"\n"
        "ssh_identity = \"/id\"\nagent = { mode = \"installed\", path = \"/opt/kb\" }\n"
        "kernels = { python3 = [\"python3\", \"-f\", \"{connection_file}\"] }\n"
        "[site.defaults]\nqueue = \"batch\"\nruntime = \"1h\"\n"
        "[site.limits]\nqueues = [\"batch\", \"gpus\"]\nmax_nodes = 4\nmax_runtime = \"24h\"\n"
        "max_gpus = 4\n",
        "/fuzz/kernel-bridge.toml", options);
  }();
  return config;
}

Peer peer_for(std::uint8_t selector) {
  Peer peer;
  switch (selector % 4) {
    case 0:
      peer.uid = 1000;
      peer.unix_user = "alice";
      break;
    case 1:
      peer.uid = 999;
      peer.unix_user = "hub";
      break;
    case 2:
      peer.uid = 4242;  // no passwd entry
      break;
    default:
      peer.transport = Peer::Transport::tcp;
      peer.remote = "127.0.0.1:4711";
      break;
  }
  return peer;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static bool once = [] {
    spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)once;
  if (size < 1) return 0;
  const Peer peer = peer_for(data[0]);
  http::request_parser<http::string_body> parser;
  parser.body_limit(fuzz_config().api.max_body);
  parser.header_limit(16 * 1024);
  parser.eager(true);
  boost::beast::error_code ec;
  parser.put(boost::asio::buffer(data + 1, size - 1), ec);
  if (!ec && !parser.is_done()) parser.put_eof(ec);
  if (ec || !parser.is_done()) return 0;  // the connection answers these itself (400/413/431)

  boost::asio::io_context io;
  kb::bridge::test::FakeKernelService service;
  kb::auth::CredentialsStore credentials;
  MetricsRegistry registry;
  BridgeMetrics metrics(registry);
  int answers = 0;
  {
    ControlApi api(io, fuzz_config(), service, credentials, metrics);
    // Two requests: the second sees what the first created (kernels, credentials).
    for (int round = 0; round < 2; ++round) {
      api.handle(peer, parser.get(), [&answers](HttpResponse response) {
        ++answers;
        if (response.result_int() < 100 || response.result_int() > 599) std::abort();
      });
      io.poll();
    }
    api.stop();
  }
  io.poll();
  // Long polls (?wait=) answer when their timer fires or the API stops: every request once.
  if (answers != 2) std::abort();
  return 0;
}
