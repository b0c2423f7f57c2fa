// Tests bridge/control_api.* over real sockets (Unix and TCP) against the in-memory KernelService
// fake: identities (SO_PEERCRED, bearer tokens, admin acting for a user), ownership, request
// validation (400/404/405/413/422 naming the field or limit), credentials kept out of logs and
// disk, /metrics in Prometheus text format, /v1/health, long polls, socket file handling.
#include "bridge/control_api.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <pwd.h>
#include <signal.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "common/text.hpp"
#include "tests/bridge/fake_kernel_service.hpp"
#include "tests/common/temp_dir.hpp"

namespace kb::bridge {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;
using ::testing::HasSubstr;

const std::string kAliceToken = "alice-0123456789abcdef0123456789abcdef";
const std::string kBobToken = "bob-0123456789abcdef0123456789abcdef00";
const std::string kHubToken = "hub-0123456789abcdef0123456789abcdef00";
const std::string kUserSecret = "eyJhbGciOiJSUzI1NiJ9.SECRET-UNICORE-TOKEN-4711.sig";

struct Reply {
  int status = 0;
  json body;
  std::string raw;
  std::map<std::string, std::string> headers;
};

std::string current_user() {
  struct passwd* pw = ::getpwuid(::getuid());
  return pw ? pw->pw_name : "";
}

json connection_file(int base = 40000) {
  return json{{"ip", "127.0.0.1"},
              {"transport", "tcp"},
              {"shell_port", base},
              {"iopub_port", base + 1},
              {"stdin_port", base + 2},
              {"control_port", base + 3},
              {"hb_port", base + 4},
              {"key", "a0b1c2d3-jupyter-hmac-key"},
              {"signature_scheme", "hmac-sha256"},
              {"kernel_name", "remote-demo"}};
}

json kernel_request(json resources = json::object()) {
  return json{{"site", "demo"},
              {"kernel", "python3"},
              {"resources", resources},
              {"connection", connection_file()}};
}

class ControlApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Capture every log line (any level) to check that secrets never reach the log.
    log_sink_ = std::make_shared<spdlog::sinks::ostream_sink_mt>(log_);
    auto logger = std::make_shared<spdlog::logger>("api-test", log_sink_);
    logger->set_level(spdlog::level::trace);
    previous_logger_ = spdlog::default_logger();
    spdlog::set_default_logger(logger);

    ::chmod(dir_.path().c_str(), 0755);  // other uids must reach the socket (peer-cred test)
    dir_.write("id_ed25519", "key\n", 0600);
    dir_.write("known_hosts", "login ssh-ed25519 AAAA\n", 0644);
    dir_.write("api-tokens",
               "# token user [admin]\n" + kAliceToken + " alice\n" + kBobToken + " bob\n\n" +
                   kHubToken + " hub admin\n",
               0600);
    std::filesystem::create_directory(dir_.file("state"));
    const std::string text =
        "[bridge]\nstate_dir = \"state\"\nmax_kernels_per_user = 3\n"
        "[api]\nunix_socket = \"run/api.sock\"\ntcp = \"127.0.0.1:0\"\ntokens_file = "
        "\"api-tokens\"\n"
        "max_body = \"8K\"\nmax_wait = \"5s\"\n"
        "[[site]]\nname = \"demo\"\nunicore_url = \"https://u.example/DEMO/rest/core\"\n"
        "login_hosts = [\"login\"]\nknown_hosts = \"known_hosts\"\nssh_user = \"kb\"\nssh_identity "
        "= \"id_ed25519\"\n"
        "agent = { mode = \"installed\", path = \"/opt/kb/kernel-bridge\" }\n"
        "kernels = { python3 = [\"python3\", \"-m\", \"ipykernel_launcher\", \"-f\", "
        "\"{connection_file}\"] }\n"
        "[site.defaults]\nqueue = \"batch\"\nruntime = \"1h\"\n"
        "[site.limits]\nqueues = [\"batch\", \"gpus\"]\nmax_nodes = 4\nmax_runtime = "
        "\"24h\"\nmax_gpus = 4\n";
    config_ = parse_config(text, dir_.file("kernel-bridge.toml"));
    api_ = std::make_unique<ControlApi>(io_, config_, service_, credentials_, metrics_);
    api_->start();
    tcp_port_ = api_->tcp_endpoint()->port();
  }

  void TearDown() override {
    if (api_) api_->stop();  // null when SetUp failed
    io_.poll();              // let the closed sessions finish
    api_.reset();
    spdlog::set_default_logger(previous_logger_);
  }

  // Runs the io_context on this thread until `done` is ready, so the fake service is only ever
  // touched here; the client side runs on its own thread with blocking sockets.
  template <class T>
  T run_until(std::future<T>& done) {
    while (done.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
      io_.run_one_for(std::chrono::milliseconds(20));
    }
    return done.get();
  }

  template <class Socket>
  static Reply exchange(Socket& socket, http::request<http::string_body> request) {
    request.prepare_payload();
    http::write(socket, request);
    beast::flat_buffer buffer;
    http::response<http::string_body> response;
    http::read(socket, buffer, response);
    Reply reply;
    reply.status = static_cast<int>(response.result_int());
    reply.raw = response.body();
    for (const auto& f : response)
      reply.headers[std::string(f.name_string())] = std::string(f.value());
    if (response[http::field::content_type] == "application/json")
      reply.body = json::parse(reply.raw, nullptr, false);
    return reply;
  }

  static http::request<http::string_body> make(http::verb verb, const std::string& target,
                                               const std::string& body,
                                               const std::map<std::string, std::string>& headers) {
    http::request<http::string_body> request{verb, target, 11};
    request.set(http::field::host, "kernel-bridge");
    for (const auto& [k, v] : headers) request.set(k, v);
    if (!body.empty()) {
      request.set(http::field::content_type, "application/json");
      request.body() = body;
    }
    return request;
  }

  // One request over TCP with the given bearer token ("" = no Authorization header).
  Reply tcp(http::verb verb, const std::string& target, const std::string& token,
            const std::string& body = "", std::map<std::string, std::string> headers = {}) {
    if (!token.empty()) headers["Authorization"] = "Bearer " + token;
    auto request = make(verb, target, body, headers);
    const auto port = tcp_port_;
    std::packaged_task<Reply()> task([request, port] {
      net::io_context client;
      net::ip::tcp::socket socket(client);
      socket.connect({net::ip::make_address("127.0.0.1"), port});
      return exchange(socket, request);
    });
    auto future = task.get_future();
    std::thread thread(std::move(task));
    Reply reply = run_until(future);
    thread.join();
    return reply;
  }

  // Requests over one Unix-socket connection (keep-alive), as this process's user.
  std::vector<Reply> unix_requests(std::vector<http::request<http::string_body>> requests) {
    const std::string path = config_.api.unix_socket;
    std::packaged_task<std::vector<Reply>()> task([requests, path] {
      net::io_context client;
      net::local::stream_protocol::socket socket(client);
      socket.connect(net::local::stream_protocol::endpoint(path));
      std::vector<Reply> replies;
      for (const auto& r : requests) replies.push_back(exchange(socket, r));
      return replies;
    });
    auto future = task.get_future();
    std::thread thread(std::move(task));
    auto replies = run_until(future);
    thread.join();
    return replies;
  }
  Reply unix_request(http::verb verb, const std::string& target, const std::string& body = "",
                     std::map<std::string, std::string> headers = {}) {
    return unix_requests({make(verb, target, body, headers)}).at(0);
  }

  // Sends bytes as they are (no HTTP library in between) over a new connection and returns all
  // the server answers until it closes; the request should say "Connection: close".
  std::string raw(const std::string& bytes, bool over_tcp) {
    const std::string path = config_.api.unix_socket;
    const auto port = tcp_port_;
    std::packaged_task<std::string()> task([bytes, over_tcp, path, port] {
      net::io_context client;
      beast::error_code ec;
      std::string answer;
      char buf[4096];
      auto exchange_raw = [&](auto& socket) {
        timeval guard{30, 0};
        ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
        net::write(socket, net::buffer(bytes), ec);
        for (;;) {
          std::size_t n = socket.read_some(net::buffer(buf), ec);
          if (ec) break;
          answer.append(buf, n);
        }
      };
      if (over_tcp) {
        net::ip::tcp::socket socket(client);
        socket.connect({net::ip::make_address("127.0.0.1"), port});
        exchange_raw(socket);
      } else {
        net::local::stream_protocol::socket socket(client);
        socket.connect(net::local::stream_protocol::endpoint(path));
        exchange_raw(socket);
      }
      return answer;
    });
    auto future = task.get_future();
    std::thread thread(std::move(task));
    std::string answer = run_until(future);
    thread.join();
    return answer;
  }
  // The JSON body of a raw answer (what follows the blank line), or a discarded value.
  static json body_of(const std::string& answer) {
    const auto start = answer.find("\r\n\r\n");
    if (start == std::string::npos) return json(json::value_t::discarded);
    return json::parse(answer.substr(start + 4), nullptr, false);
  }
  // One request over either transport: Unix as this process's user, TCP with alice's token.
  std::string request_both(bool over_tcp, const std::string& method, const std::string& target,
                           const std::string& body = "", const std::string& extra_headers = "") {
    std::string text = method + " " + target + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n";
    if (over_tcp) text += "Authorization: Bearer " + kAliceToken + "\r\n";
    text += extra_headers;
    if (!body.empty())
      text += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
              "\r\n";
    return raw(text + "\r\n" + body, over_tcp);
  }

  std::string create_as(const std::string& token, int base_port = 40000) {
    json body = kernel_request();
    body["connection"] = connection_file(base_port);
    Reply r = tcp(http::verb::post, "/v1/kernels", token, body.dump());
    EXPECT_EQ(r.status, 201) << r.raw;
    return r.body.value("id", "");
  }

  kb::test::TempDir dir_;
  std::ostringstream log_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> log_sink_;
  std::shared_ptr<spdlog::logger> previous_logger_;
  net::io_context io_;
  BridgeConfig config_;
  test::FakeKernelService service_;
  auth::CredentialsStore credentials_;
  MetricsRegistry registry_;
  BridgeMetrics metrics_{registry_};
  std::unique_ptr<ControlApi> api_;
  std::uint16_t tcp_port_ = 0;
};

TEST_F(ControlApiTest, UnixSocketIdentityIsThePeersUser) {
  struct stat st {};
  ASSERT_EQ(::stat(config_.api.unix_socket.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0666u);
  ASSERT_EQ(::stat(dir_.file("run").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0755u);

  Reply created = unix_request(http::verb::post, "/v1/kernels", kernel_request().dump());
  ASSERT_EQ(created.status, 201) << created.raw;
  EXPECT_EQ(created.body["owner"], current_user());
  EXPECT_EQ(created.headers["Location"], "/v1/kernels/" + created.body["id"].get<std::string>());
  EXPECT_EQ(created.body["state"], "requested");
  // Defaults were applied before the service saw the request.
  ASSERT_TRUE(service_.last_request);
  EXPECT_EQ(service_.last_request->resources.queue, "batch");
  EXPECT_EQ(service_.last_request->resources.runtime, std::chrono::hours(1));
  EXPECT_EQ(service_.last_request->kernel_argv.back(), "{connection_file}");
  EXPECT_EQ(service_.last_request->connection.key, "a0b1c2d3-jupyter-hmac-key");
  // The Jupyter key is passed to the service but never shown back.
  EXPECT_THAT(created.raw, ::testing::Not(HasSubstr("a0b1c2d3-jupyter-hmac-key")));
}

TEST_F(ControlApiTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  auto replies = unix_requests({make(http::verb::get, "/v1/health", "", {}),
                                make(http::verb::get, "/v1/kernels", "", {}),
                                make(http::verb::get, "/v1/kernels", "", {})});
  ASSERT_EQ(replies.size(), 3u);
  for (const auto& r : replies) EXPECT_EQ(r.status, 200);
}

// Another uid on the Unix socket is another user: it cannot see this user's kernels and its own
// kernels belong to it. Needs root to switch uid in a child process.
TEST_F(ControlApiTest, UnixSocketPeerWithAnotherUidIsAnotherUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to connect as another uid";
  struct passwd* nobody = ::getpwnam("nobody");
  if (!nobody) GTEST_SKIP() << "no user 'nobody'";
  const uid_t nobody_uid = nobody->pw_uid;
  Reply mine = unix_request(http::verb::post, "/v1/kernels", kernel_request().dump());
  ASSERT_EQ(mine.status, 201);
  const std::string my_id = mine.body["id"];

  // The child uses only system calls after fork (no allocation), then reports through a pipe.
  auto as_nobody = [&](const std::string& raw_request) {
    int fds[2];
    EXPECT_EQ(::pipe(fds), 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, config_.api.unix_socket.c_str(), sizeof addr.sun_path - 1);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      if (::setgid(nobody->pw_gid) != 0 || ::setuid(nobody_uid) != 0) ::_exit(3);
      int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
      if (::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ::_exit(4);
      if (::write(s, raw_request.data(), raw_request.size()) !=
          static_cast<ssize_t>(raw_request.size()))
        ::_exit(5);
      char buf[8192];
      ssize_t n;
      while ((n = ::read(s, buf, sizeof buf)) > 0) {
        if (::write(fds[1], buf, static_cast<size_t>(n)) != n) ::_exit(6);
      }
      ::_exit(0);
    }
    ::close(fds[1]);
    std::promise<std::string> output;
    auto future = output.get_future();
    std::thread reader([&] {
      std::string all;
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fds[0], buf, sizeof buf)) > 0) all.append(buf, static_cast<size_t>(n));
      output.set_value(all);
    });
    std::string all = run_until(future);
    reader.join();
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
    return all;
  };
  const std::string body = kernel_request().dump();
  std::string created = as_nobody(
      "POST /v1/kernels HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
      "application/json\r\n"
      "Content-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body);
  EXPECT_THAT(created, HasSubstr("HTTP/1.1 201"));
  EXPECT_THAT(created, HasSubstr("\"owner\":\"nobody\""));
  std::string other =
      as_nobody("GET /v1/kernels/" + my_id + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(other, HasSubstr("HTTP/1.1 404"));
  std::string listed =
      as_nobody("GET /v1/kernels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(listed, ::testing::Not(HasSubstr(my_id + "\"")));
  // And this user does not see nobody's kernel.
  Reply list = unix_request(http::verb::get, "/v1/kernels");
  ASSERT_EQ(list.body["kernels"].size(), 1u);
  EXPECT_EQ(list.body["kernels"][0]["id"], my_id);
}

TEST_F(ControlApiTest, TcpNeedsAValidBearerToken) {
  Reply missing = tcp(http::verb::get, "/v1/kernels", "");
  EXPECT_EQ(missing.status, 401);
  EXPECT_EQ(missing.body["field"], "Authorization");
  EXPECT_THAT(missing.headers["WWW-Authenticate"], HasSubstr("Bearer"));
  Reply wrong = tcp(http::verb::get, "/v1/kernels", "x" + kAliceToken.substr(1));
  EXPECT_EQ(wrong.status, 401);
  EXPECT_EQ(wrong.body["error"], "invalid API token");
  Reply basic =
      tcp(http::verb::get, "/v1/kernels", "", "", {{"Authorization", "Basic YWxpY2U6eA=="}});
  EXPECT_EQ(basic.status, 401);
  Reply ok = tcp(http::verb::get, "/v1/kernels", kAliceToken);
  EXPECT_EQ(ok.status, 200);
  EXPECT_EQ(ok.body["kernels"], json::array());
  // Health is open (monitoring), but nothing else.
  EXPECT_EQ(tcp(http::verb::get, "/v1/health", "").status, 200);
  EXPECT_EQ(tcp(http::verb::get, "/metrics", "").status, 401);
}

TEST_F(ControlApiTest, TokensAreReloadedAndABadFileKeepsTheOldOnes) {
  const std::string carol = std::string(40, 'c');
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", carol).status, 401);
  // The operator revokes bob and adds carol, then sends SIGHUP (serve calls reload_tokens).
  dir_.write("api-tokens", kAliceToken + " alice\n" + carol + " carol\n", 0600);
  EXPECT_EQ(api_->reload_tokens(), "");
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", carol).status, 200);
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", kBobToken).status, 401);
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", kAliceToken).status, 200);
  // A broken file is reported and changes nothing.
  dir_.write("api-tokens", "short alice\n", 0600);
  const std::string error = api_->reload_tokens();
  EXPECT_THAT(error, HasSubstr("api-tokens:1:"));
  EXPECT_THAT(log_.str(), HasSubstr("not reloaded, the tokens loaded before stay in use"));
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", carol).status, 200);
}

TEST_F(ControlApiTest, UsersCannotSeeOrTouchEachOthersKernels) {
  const std::string alice_kernel = create_as(kAliceToken, 40000);
  const std::string bob_kernel = create_as(kBobToken, 41000);

  Reply bob_list = tcp(http::verb::get, "/v1/kernels", kBobToken);
  ASSERT_EQ(bob_list.body["kernels"].size(), 1u);
  EXPECT_EQ(bob_list.body["kernels"][0]["id"], bob_kernel);

  for (auto [verb, suffix] : {std::pair{http::verb::get, ""},
                              {http::verb::delete_, ""},
                              {http::verb::post, "/interrupt"},
                              {http::verb::post, "/restart"}}) {
    Reply r = tcp(verb, "/v1/kernels/" + alice_kernel + suffix, kBobToken);
    EXPECT_EQ(r.status, 404) << suffix;
    EXPECT_EQ(r.body["error"], "no kernel " + alice_kernel);
    // The same answer as for an id that does not exist at all.
    Reply none = tcp(verb, "/v1/kernels/k999" + std::string(suffix), kBobToken);
    EXPECT_EQ(none.status, 404);
  }
  EXPECT_TRUE(service_.calls.empty());
  EXPECT_EQ(service_.get(alice_kernel)->state, KernelState::requested);

  Reply interrupt =
      tcp(http::verb::post, "/v1/kernels/" + alice_kernel + "/interrupt", kAliceToken);
  EXPECT_EQ(interrupt.status, 202);
  Reply stop = tcp(http::verb::delete_, "/v1/kernels/" + alice_kernel, kAliceToken);
  EXPECT_EQ(stop.status, 202);
  EXPECT_EQ(stop.body["state"], "ended");
  ASSERT_EQ(service_.calls.size(), 2u);
  EXPECT_EQ(service_.calls[0].action, "interrupt");
  EXPECT_EQ(service_.calls[1].action, "remove");
  EXPECT_EQ(service_.calls[1].by, "alice");
}

TEST_F(ControlApiTest, AdminTokenActsForAUserOrSeesAll) {
  const std::string alice_kernel = create_as(kAliceToken, 40000);
  create_as(kBobToken, 41000);
  Reply as_alice =
      tcp(http::verb::get, "/v1/kernels", kHubToken, "", {{"X-Kernel-Bridge-User", "alice"}});
  ASSERT_EQ(as_alice.status, 200);
  ASSERT_EQ(as_alice.body["kernels"].size(), 1u);
  EXPECT_EQ(as_alice.body["kernels"][0]["owner"], "alice");
  Reply all = tcp(http::verb::get, "/v1/kernels", kHubToken);
  EXPECT_EQ(all.body["kernels"].size(), 2u);
  // The hub starts a kernel on alice's behalf: alice owns it.
  json body = kernel_request();
  body["connection"] = connection_file(42000);
  Reply created = tcp(http::verb::post, "/v1/kernels", kHubToken, body.dump(),
                      {{"X-Kernel-Bridge-User", "alice"}});
  EXPECT_EQ(created.status, 201);
  EXPECT_EQ(created.body["owner"], "alice");
  // A non-admin may not act for someone else.
  Reply forged = tcp(http::verb::get, "/v1/kernels/" + alice_kernel, kBobToken, "",
                     {{"X-Kernel-Bridge-User", "alice"}});
  EXPECT_EQ(forged.status, 403);
  EXPECT_EQ(forged.body["field"], "X-Kernel-Bridge-User");
}

TEST_F(ControlApiTest, BadRequestsNameTheField) {
  auto post = [&](const std::string& body) {
    return tcp(http::verb::post, "/v1/kernels", kAliceToken, body);
  };
  Reply malformed = post("{\"site\": \"demo\",");
  EXPECT_EQ(malformed.status, 400);
  EXPECT_THAT(malformed.body["error"].get<std::string>(), HasSubstr("not valid JSON"));

  json unknown = kernel_request();
  unknown["resourcez"] = json::object();
  Reply r = post(unknown.dump());
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body["field"], "resourcez");
  EXPECT_EQ(r.body["error"], "unknown field 'resourcez' (did you mean 'resources'?)");

  Reply nested = post(kernel_request({{"gpu", 1}}).dump());
  EXPECT_EQ(nested.status, 400);
  EXPECT_EQ(nested.body["field"], "resources.gpu");

  Reply type = post(kernel_request({{"nodes", "2"}}).dump());
  EXPECT_EQ(type.status, 400);
  EXPECT_EQ(type.body["field"], "resources.nodes");
  EXPECT_EQ(type.body["error"], "resources.nodes must be an integer, not a string");

  json bad_port = kernel_request();
  bad_port["connection"]["hb_port"] = bad_port["connection"]["shell_port"];
  Reply port = post(bad_port.dump());
  EXPECT_EQ(port.status, 400);
  EXPECT_EQ(port.body["field"], "connection.hb_port");

  json no_site = kernel_request();
  no_site.erase("site");
  EXPECT_EQ(post(no_site.dump()).body["field"], "site");

  json bad_duration = kernel_request({{"runtime", "2 hours"}});
  Reply duration = post(bad_duration.dump());
  EXPECT_EQ(duration.status, 400);
  EXPECT_EQ(duration.body["field"], "resources.runtime");

  json lease_text = kernel_request();
  lease_text["lease"] = "90";
  EXPECT_EQ(post(lease_text.dump()).body["field"], "lease");
  json lease_short = kernel_request();
  lease_short["lease"] = 1;
  Reply short_lease = post(lease_short.dump());
  EXPECT_EQ(short_lease.status, 400);
  EXPECT_EQ(short_lease.body["error"], "lease must be between 5 and 86400");

  Reply array = post("[1,2]");
  EXPECT_EQ(array.status, 400);
  EXPECT_TRUE(service_.list().empty());
}

TEST_F(ControlApiTest, UnknownSiteAndKernelAre422) {
  json body = kernel_request();
  body["site"] = "demp";
  Reply site = tcp(http::verb::post, "/v1/kernels", kAliceToken, body.dump());
  EXPECT_EQ(site.status, 422);
  EXPECT_EQ(site.body["field"], "site");
  EXPECT_EQ(site.body["error"], "unknown site \"demp\" (did you mean \"demo\"?)");
  body = kernel_request();
  body["kernel"] = "julia";
  Reply kernel = tcp(http::verb::post, "/v1/kernels", kAliceToken, body.dump());
  EXPECT_EQ(kernel.status, 422);
  EXPECT_EQ(kernel.body["field"], "kernel");
}

TEST_F(ControlApiTest, ResourcesOutsideLimitsAre422NamingTheLimit) {
  Reply runtime = tcp(http::verb::post, "/v1/kernels", kAliceToken,
                      kernel_request({{"runtime", "48h"}}).dump());
  EXPECT_EQ(runtime.status, 422);
  EXPECT_EQ(runtime.body, (json{{"error", "runtime 48h exceeds the site's max_runtime 24h"},
                                {"field", "resources.runtime"},
                                {"limit", "max_runtime"}}));
  Reply queue = tcp(http::verb::post, "/v1/kernels", kAliceToken,
                    kernel_request({{"queue", "debug"}}).dump());
  EXPECT_EQ(queue.status, 422);
  EXPECT_EQ(queue.body["limit"], "queues");
  Reply gpus = tcp(http::verb::post, "/v1/kernels", kAliceToken,
                   kernel_request({{"gpus", 8}, {"queue", "gpus"}}).dump());
  EXPECT_EQ(gpus.body["limit"], "max_gpus");
  EXPECT_TRUE(service_.list().empty());

  // max_kernels_per_user = 3 counts live kernels only.
  for (int i = 0; i < 3; ++i) create_as(kAliceToken, 40000 + 10 * i);
  json fourth = kernel_request();
  fourth["connection"] = connection_file(45000);
  Reply over = tcp(http::verb::post, "/v1/kernels", kAliceToken, fourth.dump());
  EXPECT_EQ(over.status, 422);
  EXPECT_EQ(over.body["limit"], "max_kernels_per_user");
  service_.set_state("k1", KernelState::ended, EndCause::walltime, "walltime reached");
  EXPECT_EQ(tcp(http::verb::post, "/v1/kernels", kAliceToken, fourth.dump()).status, 201);
}

TEST_F(ControlApiTest, ServiceErrorsMapToStatuses) {
  service_.next_create_error =
      ServiceError{ServiceErrorKind::credentials_missing,
                   "no UNICORE token for alice; log in to JupyterHub again", "", ""};
  Reply r = tcp(http::verb::post, "/v1/kernels", kAliceToken, kernel_request().dump());
  EXPECT_EQ(r.status, 409);
  EXPECT_EQ(r.body["error"], "no UNICORE token for alice; log in to JupyterHub again");
  const std::string id = create_as(kAliceToken);
  service_.next_action_error = ServiceError{ServiceErrorKind::conflict, "kernel has ended", "", ""};
  EXPECT_EQ(tcp(http::verb::post, "/v1/kernels/" + id + "/restart", kAliceToken).status, 409);
}

TEST_F(ControlApiTest, UnknownRouteIs404AndWrongMethodIs405) {
  Reply route = tcp(http::verb::get, "/v1/kernel", kAliceToken);
  EXPECT_EQ(route.status, 404);
  EXPECT_THAT(route.body["error"].get<std::string>(), HasSubstr("no such route"));
  Reply method = tcp(http::verb::put, "/v1/kernels", kAliceToken, "{}");
  EXPECT_EQ(method.status, 405);
  EXPECT_EQ(method.headers["Allow"], "GET, POST");
  Reply action = tcp(http::verb::get, "/v1/kernels/k1/interrupt", kAliceToken);
  EXPECT_EQ(action.status, 405);
  EXPECT_EQ(action.headers["Allow"], "POST");
}

TEST_F(ControlApiTest, GarbageIsAnsweredWith400AndTheServerStaysUp) {
  const std::string path = config_.api.unix_socket;
  std::packaged_task<std::string()> task([path] {
    net::io_context client;
    net::local::stream_protocol::socket socket(client);
    socket.connect(net::local::stream_protocol::endpoint(path));
    const std::string garbage = "\x16\x03\x01 this is not HTTP\r\n\r\n";
    net::write(socket, net::buffer(garbage));
    std::string answer;
    beast::error_code ec;
    char buf[1024];
    for (;;) {
      std::size_t n = socket.read_some(net::buffer(buf), ec);
      if (ec) break;
      answer.append(buf, n);
    }
    return answer;
  });
  auto future = task.get_future();
  std::thread thread(std::move(task));
  const std::string answer = run_until(future);
  thread.join();
  EXPECT_THAT(answer, HasSubstr("HTTP/1.1 400"));
  EXPECT_THAT(answer, HasSubstr("malformed HTTP request"));
  EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);
}

// A client that connects and sends nothing, or only part of a request, is disconnected after
// api.read_timeout instead of holding a connection forever.
TEST_F(ControlApiTest, SilentOrSlowClientsAreDisconnected) {
  BridgeConfig quick = config_;
  quick.api.header_timeout = std::chrono::seconds(1);
  quick.api.read_timeout = std::chrono::seconds(1);
  quick.api.unix_socket = dir_.file("run/quick.sock");
  quick.api.tcp.reset();
  quick.api.tokens_file.clear();
  ControlApi api(io_, quick, service_, credentials_, metrics_);
  api.start();
  for (const std::string& prefix :
       {std::string(), std::string("GET /v1/kernels HTTP/1.1\r\nHost: x\r\n")}) {
    const std::string path = quick.api.unix_socket;
    std::packaged_task<std::string()> task([path, prefix] {
      net::io_context client;
      net::local::stream_protocol::socket socket(client);
      socket.connect(net::local::stream_protocol::endpoint(path));
      // Guard: if the server never closed, the read fails after 30 s instead of hanging the test.
      timeval guard{30, 0};
      ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
      if (!prefix.empty()) net::write(socket, net::buffer(prefix));
      char buf[256];
      beast::error_code ec;
      std::size_t n = socket.read_some(net::buffer(buf), ec);
      return ec ? ec.message() : "received " + std::to_string(n) + " bytes";
    });
    auto future = task.get_future();
    std::thread thread(std::move(task));
    const std::string outcome = run_until(future);
    thread.join();
    EXPECT_EQ(outcome, beast::error_code(net::error::eof).message()) << "prefix: " << prefix;
  }
  api.stop();
}

TEST_F(ControlApiTest, OversizedBodyIs413) {
  json body = kernel_request();
  body["name"] = std::string(9000, 'x');
  Reply r = tcp(http::verb::post, "/v1/kernels", kAliceToken, body.dump());
  EXPECT_EQ(r.status, 413);
  EXPECT_THAT(r.body["error"].get<std::string>(), HasSubstr("api.max_body"));
}

TEST_F(ControlApiTest, CredentialsStayInMemoryOnly) {
  const std::string body =
      json{{"token", kUserSecret}, {"expires_at", "2099-01-01T00:00:00Z"}}.dump();
  Reply own = tcp(http::verb::put, "/v1/users/alice/credentials", kAliceToken, body);
  EXPECT_EQ(own.status, 200);
  EXPECT_EQ(own.body["status"], "valid");
  EXPECT_EQ(own.body["expires_at"], "2099-01-01T00:00:00.000Z");
  EXPECT_EQ(credentials_.token("alice"), kUserSecret);

  Reply other = tcp(http::verb::put, "/v1/users/alice/credentials", kBobToken, body);
  EXPECT_EQ(other.status, 403);
  Reply hub = tcp(http::verb::put, "/v1/users/bob/credentials", kHubToken,
                  json{{"token", kUserSecret + "-bob"}}.dump());
  EXPECT_EQ(hub.status, 200);
  EXPECT_EQ(credentials_.token("bob"), kUserSecret + "-bob");

  Reply shown = tcp(http::verb::get, "/v1/users/alice/credentials", kAliceToken);
  EXPECT_EQ(shown.status, 200);
  EXPECT_EQ(shown.body["status"], "valid");

  Reply bad = tcp(http::verb::put, "/v1/users/alice/credentials", kAliceToken,
                  json{{"token", kUserSecret + " x"}}.dump());
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.body["field"], "token");
  Reply extra = tcp(http::verb::put, "/v1/users/alice/credentials", kAliceToken,
                    json{{"token", kUserSecret}, {"refresh", kUserSecret}}.dump());
  EXPECT_EQ(extra.status, 400);
  EXPECT_EQ(extra.body["field"], "refresh");
  Reply past = tcp(http::verb::put, "/v1/users/alice/credentials", kAliceToken,
                   json{{"token", kUserSecret}, {"expires_at", 1000}}.dump());
  EXPECT_EQ(past.status, 422);

  // Nothing of the secret in any response, log line, or file the bridge could have written.
  for (const Reply* r : {&own, &other, &hub, &shown, &bad, &extra, &past}) {
    EXPECT_THAT(r->raw, ::testing::Not(HasSubstr("SECRET-UNICORE-TOKEN"))) << r->raw;
  }
  spdlog::default_logger()->flush();
  EXPECT_THAT(log_.str(),
              HasSubstr("PUT /v1/users/alice/credentials"));  // the request was logged...
  EXPECT_THAT(log_.str(),
              ::testing::Not(HasSubstr("SECRET-UNICORE-TOKEN")));  // ...its secret was not
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir_.path())) {
    if (!entry.is_regular_file()) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_THAT(content, ::testing::Not(HasSubstr("SECRET-UNICORE-TOKEN"))) << entry.path();
  }
  EXPECT_EQ(tcp(http::verb::delete_, "/v1/users/alice/credentials", kAliceToken).status, 204);
  EXPECT_FALSE(credentials_.token("alice"));
}

TEST_F(ControlApiTest, MetricsAreValidPrometheusText) {
  create_as(kAliceToken);
  metrics_.channel_bytes.with({"iopub", "from_kernel"}).inc(1234);
  metrics_.unicore_latency.with({"demo", "GET"}).observe(0.03);
  metrics_.unicore_errors.with({"demo", "http \"503\"\n"}).inc();  // needs escaping
  Reply r = tcp(http::verb::get, "/metrics", kAliceToken);
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8");
  const std::regex help(R"(# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*)");
  const std::regex type(
      R"(# TYPE [a-zA-Z_:][a-zA-Z0-9_:]* (counter|gauge|histogram|summary|untyped))");
  const std::regex sample(
      R"([a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\\\|\\"|\\n)*"(,[a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\\\|\\"|\\n)*")*\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf))");
  std::istringstream lines(r.raw);
  std::string line;
  int samples = 0;
  while (std::getline(lines, line)) {
    if (line.rfind("# HELP", 0) == 0)
      EXPECT_TRUE(std::regex_match(line, help)) << line;
    else if (line.rfind("# TYPE", 0) == 0)
      EXPECT_TRUE(std::regex_match(line, type)) << line;
    else {
      EXPECT_TRUE(std::regex_match(line, sample)) << line;
      ++samples;
    }
  }
  EXPECT_GT(samples, 10);
  EXPECT_THAT(r.raw, HasSubstr("kb_kernels{state=\"requested\"} 1\n"));
  EXPECT_THAT(r.raw, HasSubstr("kb_kernels{state=\"ready\"} 0\n"));
  EXPECT_THAT(
      r.raw,
      HasSubstr("kb_channel_bytes_total{channel=\"iopub\",direction=\"from_kernel\"} 1234\n"));
  EXPECT_THAT(r.raw, HasSubstr("kb_unicore_request_duration_seconds_bucket{site=\"demo\",method="
                               "\"GET\",le=\"0.05\"} 1\n"));
  EXPECT_THAT(r.raw, HasSubstr("kind=\"http \\\"503\\\"\\n\""));
  EXPECT_THAT(
      r.raw,
      HasSubstr("kb_api_requests_total{method=\"POST\",route=\"/v1/kernels\",code=\"201\"} 1\n"));
}

TEST_F(ControlApiTest, HealthReportsChecksAndKernelCounts) {
  create_as(kAliceToken);
  Reply ok = unix_request(http::verb::get, "/v1/health");
  EXPECT_EQ(ok.status, 200);
  EXPECT_EQ(ok.body["status"], "ok");
  EXPECT_EQ(ok.body["kernels"]["requested"], 1);
  service_.checks.push_back(
      {"site demo: ssh login:22", false, "host key mismatch; update known_hosts"});
  Reply degraded = unix_request(http::verb::get, "/v1/health");
  EXPECT_EQ(degraded.body["status"], "degraded");
  EXPECT_EQ(degraded.body["checks"][1]["detail"], "host key mismatch; update known_hosts");
  EXPECT_EQ(unix_request(http::verb::post, "/v1/health").status, 405);
}

TEST_F(ControlApiTest, LongPollReturnsOnChange) {
  const std::string id = create_as(kAliceToken);
  // A change after the poll has started: the timer runs on the same io_context as the API.
  net::steady_timer later(io_, std::chrono::milliseconds(100));
  later.async_wait([&](beast::error_code) { service_.set_state(id, KernelState::queued); });
  Reply r = tcp(http::verb::get, "/v1/kernels/" + id + "?wait=5s&after=1", kAliceToken);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body["state"], "queued");
  EXPECT_EQ(r.body["version"], 2);
  ASSERT_EQ(r.body["history"].size(), 2u);
  EXPECT_EQ(r.body["history"][1]["state"], "queued");
  // Already newer than `after`: answered at once.
  Reply now = tcp(http::verb::get, "/v1/kernels/" + id + "?wait=5s&after=0", kAliceToken);
  EXPECT_EQ(now.body["version"], 2);
  Reply bad = tcp(http::verb::get, "/v1/kernels/" + id + "?wait=forever", kAliceToken);
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.body["field"], "wait");
}

TEST_F(ControlApiTest, LeaseIsPassedOnAndOnlyTheOwnersStatusRequestsRenewIt) {
  json body = kernel_request();
  body["connection"] = connection_file(40000);
  body["lease"] = 90;
  Reply created = tcp(http::verb::post, "/v1/kernels", kAliceToken, body.dump());
  ASSERT_EQ(created.status, 201) << created.raw;
  ASSERT_TRUE(service_.last_request);
  EXPECT_EQ(service_.last_request->lease, std::chrono::seconds(90));
  const std::string id = created.body["id"];
  EXPECT_EQ(service_.watches[id], 0);
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels/" + id, kAliceToken).status, 200);
  EXPECT_EQ(service_.watches[id], 1);
  // A long poll renews when it starts and again when it ends (the poller is still there).
  Reply polled = tcp(http::verb::get, "/v1/kernels/" + id + "?wait=1s&after=1", kAliceToken);
  EXPECT_EQ(polled.status, 200);
  EXPECT_EQ(service_.watches[id], 3);
  // The operator's view of every kernel and other users' requests do not keep it alive.
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels/" + id, kHubToken).status, 200);
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels/" + id, kBobToken).status, 404);
  EXPECT_EQ(service_.watches[id], 3);
  // Without a lease in the request, none is asked for.
  create_as(kAliceToken, 41000);
  EXPECT_EQ(service_.last_request->lease, std::chrono::seconds(0));
}

TEST_F(ControlApiTest, StaleSocketIsReplacedButALiveOneIsNot) {
  // A second API on the same path while the first listens: refused, the socket left alone.
  ControlApi second(io_, config_, service_, credentials_, metrics_);
  try {
    second.start();
    FAIL() << "expected start() to refuse a socket someone listens on";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("another process is listening"));
  }
  EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);

  // A socket file nobody listens on (a crashed bridge) is replaced.
  api_->stop();
  EXPECT_FALSE(std::filesystem::exists(config_.api.unix_socket));
  int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, config_.api.unix_socket.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ::close(s);
  ASSERT_TRUE(std::filesystem::is_socket(config_.api.unix_socket));
  api_ = std::make_unique<ControlApi>(io_, config_, service_, credentials_, metrics_);
  api_->start();
  tcp_port_ = api_->tcp_endpoint()->port();
  EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);
  // A regular file in its place is never deleted.
  api_->stop();
  dir_.write("run/api.sock", "not a socket", 0644);
  ControlApi third(io_, config_, service_, credentials_, metrics_);
  EXPECT_THROW(third.start(), std::runtime_error);
  EXPECT_TRUE(std::filesystem::is_regular_file(config_.api.unix_socket));
}

// Issue 15: requests that used to end the daemon (an exception escaping the handler). Each is sent
// over the real Unix socket and the real TCP listener; the API must answer and keep serving.
TEST_F(ControlApiTest, OverflowingNumbersAre400AndTheApiGoesOn) {
  json nodes = kernel_request();
  const std::string digits(5001, '9');
  std::string huge_nodes = nodes.dump();
  huge_nodes.replace(huge_nodes.find("{}"), 2, "{\"nodes\": " + digits + "}");
  const std::string huge_integer = "{\"site\": \"demo\", \"lease\": 18446744073709551616}";
  for (bool over_tcp : {false, true}) {
    SCOPED_TRACE(over_tcp ? "tcp" : "unix");
    for (const std::string& body :
         {std::string("1e400"), huge_nodes, huge_integer, std::string("[-1e400]")}) {
      const std::string answer = request_both(over_tcp, "POST", "/v1/kernels", body);
      EXPECT_THAT(answer, HasSubstr("HTTP/1.1 400")) << body.substr(0, 60);
      EXPECT_TRUE(body_of(answer).contains("error")) << answer.substr(0, 300);
    }
    const std::string expiry = request_both(
        over_tcp, "PUT",
        "/v1/users/" + std::string(over_tcp ? "alice" : current_user()) + "/credentials",
        "{\"token\": \"abc\", \"expires_at\": 1e300}");
    EXPECT_THAT(expiry, HasSubstr("HTTP/1.1 400"));
    EXPECT_THAT(expiry, HasSubstr("expires_at"));
    // Found by control_api_fuzz: a date past what Clock holds overflowed its conversion (UB).
    const std::string far = request_both(
        over_tcp, "PUT",
        "/v1/users/" + std::string(over_tcp ? "alice" : current_user()) + "/credentials",
        "{\"token\": \"abc\", \"expires_at\": \"3340-01-01T00:00:00Z\"}");
    EXPECT_THAT(far, HasSubstr("HTTP/1.1 400"));
  }
  EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", kAliceToken).status, 200);
  EXPECT_THAT(log_.str(), ::testing::Not(HasSubstr("internal error")));
}

TEST_F(ControlApiTest, InvalidUtf8InPathsAndHeadersIsQuotedNotFatal) {
  struct Case {
    std::string method, target, headers;
    int status;
    std::string quoted;  // how the message shows the bad byte
  };
  const std::vector<Case> cases = {
      {"GET", "/v1/kernels/%ff", "", 404, "\\xff"},
      {"DELETE", "/v1/kernels/%c3%28", "", 404, "\\xc3("},
      {"GET", "/v1/\xff\xfe", "", 404, "\\xff\\xfe"},
      {"POST", "/v1/kernels/%ff/interrupt", "", 404, "\\xff"},
      {"GET", "/v1/kernels", "X-Kernel-Bridge-User: \xff\xfe\r\n", 403, "\\xff\\xfe"},
  };
  for (bool over_tcp : {false, true}) {
    for (const auto& c : cases) {
      SCOPED_TRACE((over_tcp ? "tcp " : "unix ") + c.method + " " + printable(c.target));
      const std::string answer = request_both(over_tcp, c.method, c.target, "", c.headers);
      EXPECT_THAT(answer, HasSubstr("HTTP/1.1 " + std::to_string(c.status)));
      const json body = body_of(answer);
      ASSERT_TRUE(body.is_object()) << answer;
      // The byte is quoted, not echoed: the body is valid JSON and names it.
      EXPECT_THAT(body["error"].get<std::string>(), HasSubstr(c.quoted));
    }
  }
  EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);
  EXPECT_THAT(log_.str(), ::testing::Not(HasSubstr("internal error")));
}

// The class, not the instances: whatever a handler throws becomes a 500 for that request only.
TEST_F(ControlApiTest, AFailingHandlerIs500AndTheApiGoesOn) {
  service_.list_throws = true;
  for (bool over_tcp : {false, true}) {
    const std::string answer = request_both(over_tcp, "GET", "/v1/kernels");
    EXPECT_THAT(answer, HasSubstr("HTTP/1.1 500"));
    EXPECT_THAT(body_of(answer)["error"].get<std::string>(), HasSubstr("internal error"));
  }
  service_.list_throws = false;
  EXPECT_EQ(unix_request(http::verb::get, "/v1/kernels").status, 200);
  EXPECT_THAT(log_.str(), HasSubstr("fake: list() failed"));
  EXPECT_THAT(metrics_.registry.render(), HasSubstr("kb_api_internal_errors_total 2"));
}

TEST_F(ControlApiTest, MediaTypesAreCaseInsensitiveAndExact) {
  auto post_with = [&](const std::string& type, int base) {
    json body = kernel_request();
    body["connection"] = connection_file(base);
    const std::string text = body.dump();
    return raw("POST /v1/kernels HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: " +
                   type + "\r\nContent-Length: " + std::to_string(text.size()) + "\r\n\r\n" + text,
               false);
  };
  EXPECT_THAT(post_with("APPLICATION/JSON", 41000), HasSubstr("HTTP/1.1 201"));
  EXPECT_THAT(post_with("application/json; charset=utf-8", 41010), HasSubstr("HTTP/1.1 201"));
  EXPECT_THAT(post_with("application/jsonx", 41020), HasSubstr("HTTP/1.1 415"));
  EXPECT_THAT(post_with("text/plain", 41030), HasSubstr("HTTP/1.1 415"));
}

TEST_F(ControlApiTest, BadOrUnknownQueryParametersAre400) {
  const std::string id = create_as(kAliceToken);
  for (const std::string& query :
       {"?wait=abc", "?wait=", "?after=3", "?wait=1s&after=x", "?wiat=30s"}) {
    Reply r = tcp(http::verb::get, "/v1/kernels/" + id + query, kAliceToken);
    EXPECT_EQ(r.status, 400) << query << " " << r.raw;
  }
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels?wait=abc", kAliceToken).status, 400);
  EXPECT_EQ(tcp(http::verb::get, "/v1/kernels/" + id + "?wait=0s&after=0", kAliceToken).status,
            200);
}

TEST_F(ControlApiTest, LongIdsAreCutInLogsAndErrors) {
  const std::string id(10000, 'k');
  Reply r = tcp(http::verb::get, "/v1/kernels/" + id, kAliceToken);
  EXPECT_EQ(r.status, 404);
  EXPECT_LT(r.raw.size(), 400u);
  EXPECT_THAT(r.raw, HasSubstr("10000 bytes"));
  std::istringstream lines(log_.str());
  for (std::string line; std::getline(lines, line);) EXPECT_LT(line.size(), 600u) << line;
}

// Issue 15: 1000 idle TCP connections without a token used to take every slot, Unix callers
// included. Now the flood holds at most max_unauthenticated slots, the oldest make room for new
// ones, and the Unix socket and token holders are served throughout.
TEST_F(ControlApiTest, IdleTcpFloodLocksOutNobody) {
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = std::min<rlim_t>(limit.rlim_max, 8192);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &limit), 0);
  const auto port = tcp_port_;
  std::promise<void> opened, release;
  auto opened_future = opened.get_future();
  auto release_future = release.get_future().share();
  std::atomic<int> closed_by_server{0};
  std::thread flood([&, port, release_future] {
    net::io_context client;
    std::vector<std::unique_ptr<net::ip::tcp::socket>> sockets;
    for (int i = 0; i < 1000; ++i) {
      auto s = std::make_unique<net::ip::tcp::socket>(client);
      beast::error_code ec;
      s->connect({net::ip::make_address("127.0.0.1"), port}, ec);
      if (!ec) sockets.push_back(std::move(s));
    }
    opened.set_value();
    release_future.wait();
    for (auto& s : sockets) {
      char byte;
      if (::recv(s->native_handle(), &byte, 1, MSG_DONTWAIT) == 0) ++closed_by_server;
    }
  });
  run_until(opened_future);
  // Let the server accept the backlog (it drops the oldest unauthenticated beyond 64).
  for (int i = 0; i < 50; ++i) io_.run_for(std::chrono::milliseconds(20));
  for (int round = 0; round < 5; ++round) {
    EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);
    EXPECT_EQ(unix_request(http::verb::get, "/v1/kernels").status, 200);
    EXPECT_EQ(tcp(http::verb::get, "/v1/kernels", kAliceToken).status, 200);
  }
  release.set_value();
  flood.join();
  EXPECT_GE(closed_by_server.load(), 1000 - 64 - 1);
  EXPECT_THAT(metrics_.registry.render(), HasSubstr("kb_api_connections_refused_total"));
  EXPECT_THAT(log_.str(), HasSubstr("TCP connections without a valid token yet"));
}

// One local user holding many connections reaches its own cap (a 503 naming the limit); the
// connections it closes are counted back.
TEST_F(ControlApiTest, OneUserCannotTakeTheUnixSocket) {
  const std::string path = config_.api.unix_socket;
  std::vector<std::unique_ptr<net::local::stream_protocol::socket>> held;
  net::io_context client;
  for (std::size_t i = 0; i < config_.api.max_connections_per_user; ++i) {
    auto s = std::make_unique<net::local::stream_protocol::socket>(client);
    s->connect(net::local::stream_protocol::endpoint(path));
    held.push_back(std::move(s));
  }
  for (int i = 0; i < 20; ++i) io_.run_for(std::chrono::milliseconds(10));
  const std::string refused = raw("GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", false);
  EXPECT_THAT(refused, HasSubstr("HTTP/1.1 503"));
  EXPECT_THAT(refused, HasSubstr("api.max_connections_per_user"));
  held.clear();
  for (int i = 0; i < 20; ++i) io_.run_for(std::chrono::milliseconds(10));
  EXPECT_EQ(unix_request(http::verb::get, "/v1/health").status, 200);
}

}  // namespace
}  // namespace kb::bridge

// GET /v1/sites and GET /v1/sites/{site}/options: the configured choices plus what the site says
// of the caller (projects), and a request naming a project the site did not list is refused.
namespace kb::bridge {
namespace {

TEST_F(ControlApiTest, SitesAndTheirOptionsForTheCaller) {
  Reply sites = tcp(http::verb::get, "/v1/sites", kAliceToken);
  EXPECT_EQ(sites.status, 200);
  EXPECT_EQ(sites.body, (json{{"sites", {{{"name", "demo"}, {"description", ""}}}}}));

  service_.choices.projects = {"proj1", "users"};
  service_.choices.default_project = "users";
  service_.choices.fetched_at = Clock::now();
  Reply options = tcp(http::verb::get, "/v1/sites/demo/options", kAliceToken);
  ASSERT_EQ(options.status, 200) << options.raw;
  ASSERT_EQ(service_.choices_asked.size(), 1u);
  EXPECT_EQ(service_.choices_asked[0], (std::pair<std::string, std::string>{"alice", "demo"}));
  const json& o = options.body;
  EXPECT_EQ(o["user"], "alice");
  EXPECT_EQ(o["projects"], (json{"proj1", "users"}));
  EXPECT_EQ(o["default_project"], "users");
  EXPECT_EQ(o["default_partition"], "batch");
  EXPECT_EQ(o["kernels"], (json{"python3"}));
  ASSERT_EQ(o["partitions"].size(), 2u);
  const json& batch = o["partitions"][0];
  EXPECT_EQ(batch["name"], "batch");
  EXPECT_EQ(batch["nodes"], (json{{"min", 1}, {"max", 4}, {"default", nullptr}}));
  EXPECT_EQ(batch["gpus_per_node"]["max"], 4);
  EXPECT_EQ(batch["runtime_seconds"], (json{{"min", 1}, {"max", 86400}, {"default", 3600}}));
  EXPECT_FALSE(o.contains("projects_note"));

  service_.choices = UserSiteChoices{};
  service_.choices.note = "the bridge holds no UNICORE token of user alice";
  Reply noted = tcp(http::verb::get, "/v1/sites/demo/options", kAliceToken);
  EXPECT_EQ(noted.status, 200);
  EXPECT_EQ(noted.body["projects"], json::array());
  EXPECT_EQ(noted.body["projects_note"], "the bridge holds no UNICORE token of user alice");

  Reply unknown = tcp(http::verb::get, "/v1/sites/nowhere/options", kAliceToken);
  EXPECT_EQ(unknown.status, 404);
  EXPECT_EQ(unknown.body["field"], "site");
  EXPECT_EQ(tcp(http::verb::post, "/v1/sites/demo/options", kAliceToken).status, 405);
  EXPECT_EQ(tcp(http::verb::get, "/v1/sites/demo", kAliceToken).status, 404);
  EXPECT_EQ(tcp(http::verb::get, "/v1/sites/demo/options", "wrong-token").status, 401);
}

TEST_F(ControlApiTest, AProjectTheSiteDidNotListIsRefusedNamingTheLimit) {
  service_.projects_known = std::vector<std::string>{"proj1", "users"};
  Reply refused = tcp(http::verb::post, "/v1/kernels", kAliceToken,
                      kernel_request({{"project", "someone-elses"}}).dump());
  EXPECT_EQ(refused.status, 422);
  EXPECT_EQ(refused.body["field"], "resources.project");
  EXPECT_EQ(refused.body["limit"], "projects");
  EXPECT_EQ(refused.body["error"],
            "project \"someone-elses\" is not one user alice may charge on site demo (the site "
            "says: proj1, users)");
  EXPECT_TRUE(service_.list().empty());
  Reply ok = tcp(http::verb::post, "/v1/kernels", kAliceToken,
                 kernel_request({{"project", "proj1"}}).dump());
  EXPECT_EQ(ok.status, 201) << ok.raw;
  // Without a fresh answer from the site the bridge does not guess: UNICORE decides.
  service_.projects_known.reset();
  Reply unknown = tcp(http::verb::post, "/v1/kernels", kAliceToken,
                      kernel_request({{"project", "anything"}}).dump());
  EXPECT_EQ(unknown.status, 201) << unknown.raw;
}

}  // namespace
}  // namespace kb::bridge
