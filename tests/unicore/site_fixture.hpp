#pragma once
// Starts the UNICORE-compatible test site (tests/unicore_site/unicore_site.py) on 127.0.0.1 for one
// test, talks to its control API, and stops it (and its jobs) in the destructor, also when the test
// fails. Test-thread only; blocking is fine here.
#include <curl/curl.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace kb::unicore::testing {

inline std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

inline std::string source_dir() {
  return env_or("KB_SOURCE_DIR", KB_TEST_SOURCE_DIR);
}

struct SiteOptions {
  double queue_delay = 0.2;
  double kill_grace = 1.0;
  std::string node_name = "cn[0007-0008]";
  std::vector<std::string> extra_args;
};

class TestSite {
 public:
  explicit TestSite(SiteOptions o = {}) {
    char tmpl[] = "/tmp/kb-uclient-XXXXXX";
    if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    std::filesystem::create_directories(dir_ + "/state");
    {
      std::ofstream users(dir_ + "/users.json");
      users << R"({"users":[
        {"uid":"alice","password":"alice-pw","tokens":["tok-alice"],"groups":["users","proj1"],
         "roles":["user"],"dn":"CN=alice,O=Test"},
        {"uid":"bob","password":"bob-pw","tokens":["tok-bob"],"groups":["users"],"roles":["user"],
         "dn":"CN=bob,O=Test"}],
        "queues":["batch","gpus"]})";
    }
    std::vector<std::string> args = {env_or("KB_PYTHON", "/usr/bin/python3"),
                                     source_dir() + "/tests/unicore_site/unicore_site.py",
                                     "--users",
                                     dir_ + "/users.json",
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--state-dir",
                                     dir_ + "/state",
                                     "--queue-delay",
                                     std::to_string(o.queue_delay),
                                     "--kill-grace",
                                     std::to_string(o.kill_grace),
                                     "--node-name",
                                     o.node_name};
    args.insert(args.end(), o.extra_args.begin(), o.extra_args.end());
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe failed");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      close(out[0]);
      close(out[1]);
      int log = open((dir_ + "/site.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (log >= 0) dup2(log, 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(out[1]);
    std::string line;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < deadline) {
      pollfd p{out[0], POLLIN, 0};
      if (::poll(&p, 1, 200) > 0) {
        char buf[512];
        ssize_t n = read(out[0], buf, sizeof buf);
        if (n <= 0) break;
        line.append(buf, static_cast<std::size_t>(n));
      }
    }
    close(out[0]);
    if (line.rfind("READY ", 0) != 0) {
      stop();
      throw std::runtime_error("test site did not start (output: '" + line + "'); see " + dir_ +
                               "/site.log");
    }
    url_ = line.substr(6, line.find('\n') - 6);
    origin_ = url_.substr(0, url_.find('/', url_.find("://") + 3));
  }

  ~TestSite() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  const std::string& url() const { return url_; }
  const std::string& dir() const { return dir_; }

  nlohmann::json control(const std::string& method, const std::string& path,
                         const std::string& body = "") {
    std::unique_ptr<CURL, void (*)(CURL*)> c(curl_easy_init(), curl_easy_cleanup);
    std::string reply;
    std::string u = origin_ + path;
    curl_easy_setopt(c.get(), CURLOPT_URL, u.c_str());
    curl_easy_setopt(c.get(), CURLOPT_TIMEOUT, 20L);
    // The control channel of a TLS test site: loopback only, its certificate is the test's own.
    curl_easy_setopt(c.get(), CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(c.get(), CURLOPT_SSL_VERIFYHOST, 0L);
    curl_easy_setopt(
        c.get(), CURLOPT_WRITEFUNCTION, +[](char* d, size_t s, size_t n, void* u) {
          static_cast<std::string*>(u)->append(d, s * n);
          return s * n;
        });
    curl_easy_setopt(c.get(), CURLOPT_WRITEDATA, &reply);
    curl_slist* h = curl_slist_append(nullptr, "Content-Type: application/json");
    std::unique_ptr<curl_slist, void (*)(curl_slist*)> headers(h, curl_slist_free_all);
    curl_easy_setopt(c.get(), CURLOPT_HTTPHEADER, h);
    if (method == "POST") {
      curl_easy_setopt(c.get(), CURLOPT_POSTFIELDS, body.c_str());
    }
    CURLcode rc = curl_easy_perform(c.get());
    if (rc != CURLE_OK) throw std::runtime_error("control " + path + ": " + curl_easy_strerror(rc));
    return nlohmann::json::parse(reply, nullptr, false);
  }

  nlohmann::json faults(const nlohmann::json& f) {
    return control("POST", "/_control/faults", f.dump());
  }
  void reset() { control("POST", "/_control/reset", "{}"); }
  // The requests the site received since the last call (and forgets them).
  nlohmann::json take_requests() { return control("GET", "/_control/requests?clear=1"); }
  nlohmann::json jobs() { return control("GET", "/_control/jobs"); }
  nlohmann::json job(const std::string& id) { return control("GET", "/_control/jobs/" + id); }

 private:
  void stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  std::string dir_;
  std::string url_;
  std::string origin_;
  pid_t pid_ = -1;
};

}  // namespace kb::unicore::testing
