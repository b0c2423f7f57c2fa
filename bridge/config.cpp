#include "bridge/config.hpp"

#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "common/files.hpp"

namespace kb::bridge {
namespace {

namespace fs = std::filesystem;

const char* type_name(toml::node_type type) {
  switch (type) {
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a number";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::table:
      return "a table";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
    default:
      return "nothing";
  }
}

int line_of(const toml::node& node) {
  return static_cast<int>(node.source().begin.line);
}

// Reads one file into a BridgeConfig, remembering where things are for messages.
class ConfigReader {
 public:
  ConfigReader(std::string file, const LoadOptions& options)
      : file_(std::move(file)), options_(options) {
    base_dir_ = fs::path(file_).parent_path();
    if (base_dir_.empty()) base_dir_ = ".";
  }

  [[noreturn]] void fail(int line, const std::string& message) const {
    throw ConfigError(file_, line, message);
  }
  [[noreturn]] void fail(const toml::node& node, const std::string& message) const {
    fail(line_of(node), message);
  }

  // Every key of `table` must be in `allowed`.
  void check_keys(const toml::table& table, const std::string& where,
                  const std::vector<std::string>& allowed) const {
    for (auto&& [key, value] : table) {
      const std::string name(key.str());
      if (std::find(allowed.begin(), allowed.end(), name) != allowed.end()) continue;
      std::string message = "unknown key '" + name + "' in " + where;
      const std::string guess = closest_match(name, allowed);
      if (!guess.empty()) {
        message += " (did you mean '" + guess + "'?)";
      } else {
        std::string list;
        for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
        message += "; known keys: " + list;
      }
      const int line = static_cast<int>(key.source().begin.line);
      fail(line > 0 ? line : line_of(value), message);
    }
  }

  const toml::table& require_table(const toml::table& parent, const std::string& key,
                                   const std::string& where) const {
    const toml::node* node = parent.get(key);
    if (!node) fail(parent, "missing table [" + where + "]");
    if (!node->is_table()) fail(*node, where + " must be a table, not " + type_name(node->type()));
    return *node->as_table();
  }

  const toml::table* optional_table(const toml::table& parent, const std::string& key,
                                    const std::string& where) const {
    const toml::node* node = parent.get(key);
    if (!node) return nullptr;
    if (!node->is_table()) fail(*node, where + " must be a table, not " + type_name(node->type()));
    return node->as_table();
  }

  const toml::node& require(const toml::table& table, const std::string& key,
                            const std::string& where) const {
    const toml::node* node = table.get(key);
    if (!node) fail(table, "missing required key '" + key + "' in " + where);
    return *node;
  }

  std::optional<std::string> string_value(const toml::table& table, const std::string& key,
                                          const std::string& where, bool required = false,
                                          bool allow_empty = false) const {
    const toml::node* node = table.get(key);
    if (!node) {
      if (required) fail(table, "missing required key '" + key + "' in " + where);
      return std::nullopt;
    }
    if (!node->is_string()) {
      fail(*node, where + "." + key + " must be a string, not " + type_name(node->type()));
    }
    std::string value = node->as_string()->get();
    if (value.empty() && !allow_empty) fail(*node, where + "." + key + " must not be empty");
    return value;
  }

  std::optional<bool> bool_value(const toml::table& table, const std::string& key,
                                 const std::string& where) const {
    const toml::node* node = table.get(key);
    if (!node) return std::nullopt;
    if (!node->is_boolean()) {
      fail(*node, where + "." + key + " must be true or false, not " + type_name(node->type()));
    }
    return node->as_boolean()->get();
  }

  std::optional<int> int_value(const toml::table& table, const std::string& key,
                               const std::string& where, int min, int max) const {
    const toml::node* node = table.get(key);
    if (!node) return std::nullopt;
    if (!node->is_integer()) {
      fail(*node, where + "." + key + " must be an integer, not " + type_name(node->type()));
    }
    const auto value = node->as_integer()->get();
    if (value < min || value > max) {
      fail(*node, where + "." + key + " = " + std::to_string(value) + " is out of range (" +
                      std::to_string(min) + " to " + std::to_string(max) + ")");
    }
    return static_cast<int>(value);
  }

  std::optional<std::chrono::seconds> duration_value(const toml::table& table,
                                                     const std::string& key,
                                                     const std::string& where) const {
    const toml::node* node = table.get(key);
    if (!node) return std::nullopt;
    if (!node->is_string()) {
      fail(*node, where + "." + key + " must be a duration string such as \"30s\", \"15m\", " +
                      "\"2h30m\" or \"1d\", not " + type_name(node->type()));
    }
    std::string error;
    auto d = parse_duration(node->as_string()->get(), &error);
    if (!d) fail(*node, where + "." + key + ": " + error);
    return d;
  }

  std::optional<std::uint64_t> size_value(const toml::table& table, const std::string& key,
                                          const std::string& where) const {
    const toml::node* node = table.get(key);
    if (!node) return std::nullopt;
    if (!node->is_string()) {
      fail(*node, where + "." + key + " must be a size string such as \"512M\" or \"16G\", not " +
                      type_name(node->type()));
    }
    std::string error;
    auto size = parse_size(node->as_string()->get(), &error);
    if (!size) fail(*node, where + "." + key + ": " + error);
    return size;
  }

  std::vector<std::string> string_list(const toml::node& node, const std::string& what,
                                       bool allow_empty_list) const {
    if (!node.is_array())
      fail(node, what + " must be an array of strings, not " + type_name(node.type()));
    std::vector<std::string> out;
    for (const auto& element : *node.as_array()) {
      if (!element.is_string()) {
        fail(element.source().begin.line > 0 ? element : node,
             what + " must contain only strings, found " + type_name(element.type()));
      }
      std::string s = element.as_string()->get();
      if (s.empty())
        fail(element.source().begin.line > 0 ? element : node, what + " contains an empty string");
      out.push_back(std::move(s));
    }
    if (out.empty() && !allow_empty_list) fail(node, what + " must not be empty");
    return out;
  }

  std::string resolve_path(const std::string& path) const {
    if (path.empty()) return path;
    fs::path p(path);
    if (p.is_relative()) p = base_dir_ / p;
    return p.lexically_normal().string();
  }

  // A file the bridge reads: must exist and be a regular file. `secret`: must not be readable or
  // writable by group or others.
  void check_file(const toml::node& node, const std::string& what, const std::string& path,
                  bool secret) const {
    if (!options_.check_files) return;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      fail(
          node,
          what + " " + path + ": " + std::strerror(errno) +
              "; check the path (relative paths are read from the configuration file's directory)");
    }
    if (!S_ISREG(st.st_mode)) fail(node, what + " " + path + " is not a regular file");
    if (::access(path.c_str(), R_OK) != 0) {
      fail(node, what + " " + path + " is not readable by this user (uid " +
                     std::to_string(::geteuid()) + "); fix its owner or mode");
    }
    if (secret && (st.st_mode & 077) != 0) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      fail(node, what + " " + path + " is accessible by group or others (mode " + mode +
                     "); run: chmod 600 " + path);
    }
  }

  // default_port 0: the port is required. allow_port_zero: "any free port" (listeners in tests).
  HostPort host_port(const toml::node& node, const std::string& what, std::uint16_t default_port,
                     bool allow_port_zero = false) const {
    const std::string text = node.as_string()->get();
    HostPort hp;
    std::string port_text;
    if (!text.empty() && text.front() == '[') {
      auto close = text.find(']');
      if (close == std::string::npos)
        fail(node, what + " \"" + text + "\": missing ']' after the IPv6 address");
      hp.host = text.substr(1, close - 1);
      if (close + 1 < text.size()) {
        if (text[close + 1] != ':') fail(node, what + " \"" + text + "\": expected ':' after ']'");
        port_text = text.substr(close + 2);
        if (port_text.empty()) fail(node, what + " \"" + text + "\": missing port after ':'");
      }
    } else {
      auto colon = text.rfind(':');
      if (colon != std::string::npos && text.find(':') != colon) {
        fail(node, what + " \"" + text + "\": write IPv6 addresses as [addr]:port");
      }
      hp.host = text.substr(0, colon);
      if (colon != std::string::npos) {
        port_text = text.substr(colon + 1);
        if (port_text.empty()) fail(node, what + " \"" + text + "\": missing port after ':'");
      }
    }
    if (hp.host.empty()) fail(node, what + " \"" + text + "\": missing host name");
    for (char c : hp.host) {
      if (std::isspace(static_cast<unsigned char>(c)) || c == '/' || c == '@') {
        fail(node, what + " \"" + text +
                       "\": not a host name (write host:port; the SSH user goes in ssh_user)");
      }
    }
    if (port_text.empty()) {
      if (default_port == 0) fail(node, what + " \"" + text + "\": missing port (write host:port)");
      hp.port = default_port;
    } else {
      long port = 0;
      for (char c : port_text) {
        if (c < '0' || c > '9' || port > 65535) {
          fail(node, what + " \"" + text + "\": port must be a number from 1 to 65535");
        }
        port = port * 10 + (c - '0');
      }
      if ((port < 1 && !allow_port_zero) || port > 65535) {
        fail(node, what + " \"" + text + "\": port must be a number from 1 to 65535");
      }
      hp.port = static_cast<std::uint16_t>(port);
    }
    return hp;
  }

  BridgeConfig read(const toml::table& root) {
    BridgeConfig config;
    config.file = file_;
    check_keys(root, "the top level", {"bridge", "api", "site"});

    const toml::table& bridge = require_table(root, "bridge", "bridge");
    check_keys(bridge, "[bridge]",
               {"state_dir", "log_level", "restart_grace", "ended_retention",
                "max_kernels_per_user", "on_stop"});
    config.state_dir = resolve_path(*string_value(bridge, "state_dir", "bridge", true));
    if (options_.check_files) {
      struct stat st {};
      if (::stat(config.state_dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
        fail(*bridge.get("state_dir"),
             "bridge.state_dir " + config.state_dir + " exists but is not a directory");
      }
    }
    if (auto level = string_value(bridge, "log_level", "bridge")) {
      static const std::vector<std::string> levels{"trace", "debug", "info",
                                                   "warn",  "error", "off"};
      if (std::find(levels.begin(), levels.end(), *level) == levels.end()) {
        std::string message = "bridge.log_level \"" + *level +
                              "\" is not a log level (use trace, debug, info, warn, error or off)";
        fail(*bridge.get("log_level"), message);
      }
      config.log_level = *level;
    }
    if (auto d = duration_value(bridge, "restart_grace", "bridge")) config.restart_grace = *d;
    if (auto d = duration_value(bridge, "ended_retention", "bridge")) config.ended_retention = *d;
    if (auto n = int_value(bridge, "max_kernels_per_user", "bridge", 0, 100000))
      config.max_kernels_per_user = *n;
    if (auto mode = string_value(bridge, "on_stop", "bridge")) {
      if (*mode == "keep-kernels") {
        config.on_stop = OnStop::keep_kernels;
      } else if (*mode == "end-kernels") {
        config.on_stop = OnStop::end_kernels;
      } else {
        fail(*bridge.get("on_stop"), "bridge.on_stop \"" + *mode +
                                         "\" is not a choice: use \"keep-kernels\" (a restart "
                                         "re-attaches them) or \"end-kernels\"");
      }
    }

    read_api(require_table(root, "api", "api"), config.api);

    const toml::node* sites = root.get("site");
    if (!sites)
      fail(1,
           "no [[site]] configured: add at least one [[site]] table (see etc/kernel-bridge.toml)");
    if (!sites->is_array_of_tables()) {
      fail(*sites, "site must be an array of tables: write each site as [[site]], not [site]");
    }
    std::set<std::string> names;
    for (const auto& element : *sites->as_array()) {
      SiteConfig site = read_site(*element.as_table());
      if (!names.insert(site.name).second) {
        fail(site.line,
             "site \"" + site.name + "\" is configured twice; site names must be unique");
      }
      config.sites.push_back(std::move(site));
    }
    return config;
  }

  void read_api(const toml::table& api, ApiConfig& out) {
    check_keys(api, "[api]",
               {"unix_socket", "tcp", "tokens_file", "admin_users", "max_body", "header_timeout",
                "read_timeout", "idle_timeout", "max_wait", "max_connections",
                "max_connections_per_user"});
    if (auto s = string_value(api, "unix_socket", "api")) out.unix_socket = resolve_path(*s);
    if (const toml::node* tcp = api.get("tcp")) {
      if (!tcp->is_string())
        fail(*tcp, std::string("api.tcp must be a string \"address:port\", not ") +
                       type_name(tcp->type()));
      out.tcp = host_port(*tcp, "api.tcp", 0, true);
    }
    if (auto s = string_value(api, "tokens_file", "api")) {
      out.tokens_file = resolve_path(*s);
      check_file(*api.get("tokens_file"), "api.tokens_file", out.tokens_file, true);
    }
    if (out.tcp && out.tokens_file.empty()) {
      fail(*api.get("tcp"),
           "api.tcp needs api.tokens_file: TCP callers authenticate with bearer tokens");
    }
    if (!out.tcp && out.unix_socket.empty()) {
      fail(api, "[api] has no listener: set unix_socket, tcp, or both");
    }
    if (const toml::node* admins = api.get("admin_users")) {
      out.admin_users = string_list(*admins, "api.admin_users", true);
    }
    if (auto size = size_value(api, "max_body", "api")) {
      if (*size < 1024) fail(*api.get("max_body"), "api.max_body must be at least 1K");
      out.max_body = *size;
    }
    if (auto d = duration_value(api, "header_timeout", "api")) out.header_timeout = *d;
    if (auto d = duration_value(api, "read_timeout", "api")) out.read_timeout = *d;
    if (auto d = duration_value(api, "idle_timeout", "api")) out.idle_timeout = *d;
    if (auto d = duration_value(api, "max_wait", "api")) out.max_wait = *d;
    for (const char* key : {"header_timeout", "read_timeout", "idle_timeout"}) {
      const std::string k(key);
      const auto value = k == "header_timeout" ? out.header_timeout
                         : k == "read_timeout" ? out.read_timeout
                                               : out.idle_timeout;
      if (value.count() == 0 && api.get(key))
        fail(*api.get(key), "api." + k + " must be longer than 0s");
    }
    if (auto n = int_value(api, "max_connections", "api", 16, 100000))
      out.max_connections = static_cast<std::size_t>(*n);
    if (auto n = int_value(api, "max_connections_per_user", "api", 1, 100000))
      out.max_connections_per_user = static_cast<std::size_t>(*n);
  }

  SiteConfig read_site(const toml::table& table) {
    SiteConfig site;
    site.line = line_of(table);
    const std::vector<std::string> keys{
        "name",          "description",     "unicore_url", "ca_file",        "verify_tls",
        "login_hosts",   "known_hosts",     "ssh_user",    "ssh_identity",   "ssh_cipher",
        "ssh_keepalive", "connect_timeout", "agent",       "gpu_mode",       "job_template",
        "environment",   "job_tags",        "kernels",     "default_kernel", "defaults",
        "limits",        "partitions",      "reservations"};
    site.name = *string_value(table, "name", "[[site]]", true);
    for (char c : site.name) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
        fail(*table.get("name"), "site name \"" + site.name +
                                     "\" may contain only letters, digits, '-', '_' and '.' (it "
                                     "appears in URLs and job tags)");
      }
    }
    const std::string where = "site \"" + site.name + "\"";
    const std::string prefix = "site";
    check_keys(table, where, keys);
    for (const char* key :
         {"unicore_url", "login_hosts", "known_hosts", "ssh_user", "ssh_identity", "agent"}) {
      require(table, key, where);
    }

    if (auto s = string_value(table, "description", prefix, false, true)) site.description = *s;
    site.unicore_url = *string_value(table, "unicore_url", prefix, true);
    if (site.unicore_url.rfind("https://", 0) != 0 && site.unicore_url.rfind("http://", 0) != 0) {
      fail(*table.get("unicore_url"), where +
                                          ": unicore_url must start with https:// (or http:// on "
                                          "test sites), e.g. https://host:8080/SITE/rest/core");
    }
    while (site.unicore_url.size() > 1 && site.unicore_url.back() == '/')
      site.unicore_url.pop_back();

    if (auto v = bool_value(table, "verify_tls", prefix)) site.verify_tls = *v;
    if (auto s = string_value(table, "ca_file", prefix)) {
      if (!site.verify_tls)
        fail(*table.get("ca_file"),
             where + ": ca_file is set but verify_tls = false; remove one of them");
      site.ca_file = resolve_path(*s);
      check_file(*table.get("ca_file"), where + ": ca_file", site.ca_file, false);
    }

    const toml::node& hosts = require(table, "login_hosts", where);
    if (!hosts.is_array())
      fail(hosts, prefix + ".login_hosts must be an array of \"host:port\" strings, not " +
                      type_name(hosts.type()));
    for (const auto& h : *hosts.as_array()) {
      const toml::node& at = h.source().begin.line > 0 ? h : hosts;
      if (!h.is_string()) fail(at, where + ": login_hosts must contain only \"host:port\" strings");
      site.login_hosts.push_back(host_port(h, where + ": login host", 22));
    }
    if (site.login_hosts.empty())
      fail(hosts, where + ": login_hosts must name at least one login node");

    site.known_hosts = resolve_path(*string_value(table, "known_hosts", prefix, true));
    check_file(*table.get("known_hosts"), where + ": known_hosts", site.known_hosts, false);
    site.ssh_user = *string_value(table, "ssh_user", prefix, true);
    site.ssh_identity = resolve_path(*string_value(table, "ssh_identity", prefix, true));
    check_file(*table.get("ssh_identity"), where + ": ssh_identity", site.ssh_identity, true);
    if (auto s = string_value(table, "ssh_cipher", prefix, false, true)) site.ssh_cipher = *s;
    if (auto d = duration_value(table, "ssh_keepalive", prefix)) site.ssh_keepalive = *d;
    if (auto d = duration_value(table, "connect_timeout", prefix)) {
      if (d->count() == 0)
        fail(*table.get("connect_timeout"), where + ": connect_timeout must be longer than 0s");
      site.connect_timeout = *d;
    }

    read_agent(require(table, "agent", where), where, site.agent);

    if (auto mode = string_value(table, "gpu_mode", prefix)) {
      if (*mode == "gpus_per_node")
        site.gpu_mode = GpuMode::gpus_per_node;
      else if (*mode == "batch_lines")
        site.gpu_mode = GpuMode::batch_lines;
      else
        fail(*table.get("gpu_mode"),
             where + ": gpu_mode \"" + *mode +
                 "\" is not known (use \"gpus_per_node\" or \"batch_lines\")");
    }
    if (auto t = string_value(table, "job_template", prefix)) {
      site.job_template = *t;
      check_template(*table.get("job_template"), where, site.job_template);
    }
    if (const toml::table* env = optional_table(table, "environment", where + ": environment")) {
      for (auto&& [key, value] : *env) {
        const std::string name(key.str());
        bool valid = !name.empty() && !std::isdigit(static_cast<unsigned char>(name[0]));
        for (char c : name)
          valid = valid && (std::isalnum(static_cast<unsigned char>(c)) || c == '_');
        if (!valid)
          fail(static_cast<int>(key.source().begin.line),
               where + ": environment variable name '" + name +
                   "' is not valid (letters, digits, '_')");
        if (!value.is_string())
          fail(value, where + ": environment." + name + " must be a string, not " +
                          type_name(value.type()));
        site.environment[name] = value.as_string()->get();
      }
    }
    if (const toml::node* tags = table.get("job_tags"))
      site.job_tags = string_list(*tags, where + ": job_tags", true);

    if (const toml::table* kernels = optional_table(table, "kernels", where + ": kernels")) {
      for (auto&& [key, value] : *kernels) {
        const std::string name(key.str());
        auto argv = string_list(value, where + ": kernels." + name, false);
        bool has_placeholder = false;
        for (const auto& a : argv)
          has_placeholder = has_placeholder || a.find("{connection_file}") != std::string::npos;
        if (!has_placeholder) {
          fail(value, where + ": kernels." + name +
                          " must contain \"{connection_file}\" (the agent puts the kernel's "
                          "connection file there)");
        }
        site.kernels[name] = std::move(argv);
      }
    }
    if (auto k = string_value(table, "default_kernel", prefix)) {
      if (!site.kernels.count(*k)) {
        fail(*table.get("default_kernel"),
             where + ": default_kernel \"" + *k + "\" is not in [site.kernels]");
      }
      site.default_kernel = *k;
    }

    if (const toml::table* limits = optional_table(table, "limits", where + ": limits")) {
      read_limits(*limits, where, site.limits);
    }
    if (const toml::node* reservations = table.get("reservations")) {
      site.reservations = string_list(*reservations, where + ": reservations", true);
    }
    if (const toml::node* partitions = table.get("partitions")) {
      read_partitions(*partitions, where, site);
    }
    if (const toml::table* defaults = optional_table(table, "defaults", where + ": defaults")) {
      read_defaults(*defaults, where, site.defaults);
      // Defaults must be requestable, or every kernel relying on them would be refused.
      KernelRequest probe;
      apply_defaults(site, probe.resources);
      if (auto violation = validate_request(site, probe)) {
        std::string key = violation->field.substr(violation->field.find('.') + 1);
        const toml::node* at = defaults->get(key);
        fail(at ? line_of(*at) : line_of(*defaults),
             where + ": defaults." + key + " is outside the site's limits: " + violation->message);
      }
    }
    // So must every partition's (its own, and the site's it inherits).
    for (const auto& p : site.partitions) {
      KernelRequest probe;
      probe.resources.queue = p.name;
      apply_defaults(site, probe.resources);
      if (auto violation = validate_request(site, probe)) {
        fail(p.line, where + ": partition \"" + p.name +
                         "\": its defaults are outside its limits: " + violation->message);
      }
    }
    return site;
  }

  void read_agent(const toml::node& node, const std::string& where, AgentConfig& agent) {
    if (!node.is_table()) {
      fail(node, where +
                     ": agent must be a table such as { mode = \"installed\", path = "
                     "\"/opt/kernel-bridge/bin/kernel-bridge\" }");
    }
    const toml::table& table = *node.as_table();
    check_keys(table, where + ": agent", {"mode", "path"});
    const std::string mode = *string_value(table, "mode", where + ": agent", true);
    if (mode == "installed") {
      agent.mode = AgentConfig::Mode::installed;
      agent.path = *string_value(table, "path", where + ": agent", true);
      if (agent.path.front() != '/') {
        fail(*table.get("path"), where +
                                     ": agent.path must be an absolute path on the site (where "
                                     "kernel-bridge is installed)");
      }
    } else if (mode == "upload") {
      agent.mode = AgentConfig::Mode::upload;
      if (auto path = string_value(table, "path", where + ": agent")) {
        agent.path = resolve_path(*path);
        check_file(*table.get("path"), where + ": agent.path", agent.path, false);
      } else {
        std::error_code ec;
        agent.path = fs::read_symlink("/proc/self/exe", ec).string();
      }
    } else {
      fail(*table.get("mode"),
           where + ": agent.mode \"" + mode + "\" is not known (use \"installed\" or \"upload\")");
    }
  }

  void check_template(const toml::node& node, const std::string& where, const std::string& text) {
    bool has_agent = false;
    for (std::size_t i = 0; i < text.size(); ++i) {
      if (text[i] != '{' || (i > 0 && text[i - 1] == '$')) continue;
      std::size_t end = i + 1;
      while (end < text.size() &&
             (std::islower(static_cast<unsigned char>(text[end])) || text[end] == '_'))
        ++end;
      if (end == i + 1 || end >= text.size() || text[end] != '}') continue;
      const std::string name = text.substr(i + 1, end - i - 1);
      if (name == "agent") {
        has_agent = true;
      } else if (name != "kernel_argv") {
        std::string message = where + ": job_template has an unknown placeholder {" + name + "}";
        const std::string guess = closest_match(name, {"agent", "kernel_argv"});
        message +=
            guess.empty() ? " (known: {agent}, {kernel_argv})" : " (did you mean {" + guess + "}?)";
        fail(node, message);
      }
    }
    if (!has_agent)
      fail(node, where +
                     ": job_template must contain {agent}: the job's main process is the agent, "
                     "which starts the kernel");
  }

  void read_defaults(const toml::table& table, const std::string& where, ResourceDefaults& d) {
    const std::string w = where + ": defaults";
    check_keys(table, w,
               {"queue", "nodes", "gpus", "runtime", "project", "reservation", "qos", "memory"});
    d.queue = string_value(table, "queue", "defaults");
    d.nodes = int_value(table, "nodes", "defaults", 1, 1000000);
    d.gpus = int_value(table, "gpus", "defaults", 0, 1024);
    d.runtime = duration_value(table, "runtime", "defaults");
    if (d.runtime && d.runtime->count() == 0)
      fail(*table.get("runtime"), w + ".runtime must be longer than 0s");
    d.project = string_value(table, "project", "defaults");
    d.reservation = string_value(table, "reservation", "defaults");
    d.qos = string_value(table, "qos", "defaults");
    d.memory = size_value(table, "memory", "defaults");
  }

  // [[site.partitions]]: name, description, max_* (limits) and default_* (defaults).
  void read_partitions(const toml::node& node, const std::string& where, SiteConfig& site) {
    const toml::array* list = node.as_array();
    if (!list || list->empty()) {
      fail(node, where + ": partitions must be a list of tables ([[site.partitions]] blocks)");
    }
    if (!site.limits.queues.empty()) {
      fail(node, where +
                     ": give the queues either as limits.queues or as [[site.partitions]], not "
                     "both");
    }
    for (const toml::node& element : *list) {
      const toml::table* t = element.as_table();
      if (!t) fail(element, where + ": each partition must be a table");
      const std::string w = where + ": partition";
      check_keys(*t, w,
                 {"name", "description", "max_nodes", "max_gpus", "max_runtime", "max_memory",
                  "default_nodes", "default_gpus", "default_runtime", "default_memory"});
      PartitionConfig p;
      p.line = line_of(*t);
      p.name = *string_value(*t, "name", w, true);
      if (find_partition(site, p.name)) {
        fail(*t->get("name"), where + ": partition \"" + p.name + "\" is listed twice");
      }
      const std::string pw = where + ": partition \"" + p.name + "\"";
      p.description = string_value(*t, "description", pw).value_or("");
      p.limits.max_nodes = int_value(*t, "max_nodes", pw, 1, 1000000);
      p.limits.max_gpus = int_value(*t, "max_gpus", pw, 0, 1024);
      p.limits.max_runtime = duration_value(*t, "max_runtime", pw);
      p.limits.max_memory = size_value(*t, "max_memory", pw);
      p.defaults.nodes = int_value(*t, "default_nodes", pw, 1, 1000000);
      p.defaults.gpus = int_value(*t, "default_gpus", pw, 0, 1024);
      p.defaults.runtime = duration_value(*t, "default_runtime", pw);
      if (p.defaults.runtime && p.defaults.runtime->count() == 0)
        fail(*t->get("default_runtime"), pw + ": default_runtime must be longer than 0s");
      p.defaults.memory = size_value(*t, "default_memory", pw);
      site.partitions.push_back(std::move(p));
    }
  }

  void read_limits(const toml::table& table, const std::string& where, ResourceLimits& l) {
    const std::string w = where + ": limits";
    check_keys(table, w, {"queues", "max_nodes", "max_gpus", "max_runtime", "max_memory"});
    if (const toml::node* q = table.get("queues"))
      l.queues = string_list(*q, "limits.queues", true);
    l.max_nodes = int_value(table, "max_nodes", "limits", 1, 1000000);
    l.max_gpus = int_value(table, "max_gpus", "limits", 0, 1024);
    l.max_runtime = duration_value(table, "max_runtime", "limits");
    l.max_memory = size_value(table, "max_memory", "limits");
  }

 private:
  std::string file_;
  fs::path base_dir_;
  LoadOptions options_;
};

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string HostPort::str() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

const SiteConfig* BridgeConfig::find_site(std::string_view name) const {
  for (const auto& site : sites) {
    if (site.name == name) return &site;
  }
  return nullptr;
}

std::string closest_match(std::string_view word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_distance = 3;
  for (const auto& c : candidates) {
    std::size_t d = edit_distance(word, c);
    if (word.size() >= 3 && c.rfind(word, 0) == 0) d = std::min<std::size_t>(d, 1);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  return best;
}

std::optional<std::chrono::seconds> parse_duration(std::string_view text, std::string* error) {
  auto bad = [&](const std::string& why) -> std::optional<std::chrono::seconds> {
    if (error)
      *error = "\"" + std::string(text) + "\" is not a duration: " + why +
               " (write e.g. \"30s\", \"15m\", \"2h30m\", \"1d\")";
    return std::nullopt;
  };
  if (text.empty()) return bad("it is empty");
  static constexpr struct {
    char unit;
    long long seconds;
  } kUnits[] = {{'d', 86400}, {'h', 3600}, {'m', 60}, {'s', 1}};
  long long total = 0;
  int last_unit = -1;
  std::size_t i = 0;
  while (i < text.size()) {
    if (text[i] < '0' || text[i] > '9')
      return bad(std::string("expected a number at '") + text[i] + "'");
    long long number = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      number = number * 10 + (text[i] - '0');
      if (number > 100LL * 365 * 86400) return bad("the number is too large");
      ++i;
    }
    if (i == text.size())
      return bad("a unit is missing after " + std::to_string(number) + " (d, h, m or s)");
    int unit = -1;
    for (int u = 0; u < 4; ++u) {
      if (text[i] == kUnits[u].unit) unit = u;
    }
    if (unit < 0) return bad(std::string("unknown unit '") + text[i] + "' (use d, h, m or s)");
    // "min" is UNICORE's spelling of minutes; accept it so values copied from job descriptions
    // work.
    if (text[i] == 'm' && text.substr(i, 3) == "min") i += 2;
    if (unit <= last_unit) return bad("units must go from larger to smaller, each once");
    last_unit = unit;
    total += number * kUnits[unit].seconds;
    ++i;
  }
  if (total > 100LL * 365 * 86400) return bad("it is longer than 100 years");
  return std::chrono::seconds(total);
}

std::string format_duration(std::chrono::seconds d) {
  long long s = d.count();
  if (s == 0) return "0s";
  std::string out;
  // Hours, not days: walltimes are thought of in hours ("48h" reads better than "2d").
  for (auto [unit, size] : {std::pair{'h', 3600LL}, {'m', 60LL}, {'s', 1LL}}) {
    if (s >= size) {
      out += std::to_string(s / size) + unit;
      s %= size;
    }
  }
  return out;
}

std::optional<std::uint64_t> parse_size(std::string_view text, std::string* error) {
  auto bad = [&](const std::string& why) -> std::optional<std::uint64_t> {
    if (error)
      *error = "\"" + std::string(text) + "\" is not a size: " + why +
               " (write e.g. \"512M\", \"16G\", \"1T\"; units are powers of 1024)";
    return std::nullopt;
  };
  std::size_t i = 0;
  std::uint64_t number = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    if (number > (std::uint64_t{1} << 50)) return bad("the number is too large");
    number = number * 10 + static_cast<std::uint64_t>(text[i] - '0');
    ++i;
  }
  if (i == 0) return bad("expected a number");
  std::string unit(text.substr(i));
  if (unit.empty()) return bad("a unit is missing (K, M, G or T)");
  static const std::map<std::string, int> kShifts{
      {"K", 10},  {"KB", 10},  {"KiB", 10}, {"M", 20},  {"MB", 20},  {"MiB", 20}, {"G", 30},
      {"GB", 30}, {"GiB", 30}, {"T", 40},   {"TB", 40}, {"TiB", 40}, {"B", 0}};
  auto it = kShifts.find(unit);
  if (it == kShifts.end()) {
    std::string upper = unit;
    for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    it = kShifts.find(upper);
    if (it == kShifts.end()) return bad("unknown unit '" + unit + "'");
  }
  if (it->second > 0 && number > (std::numeric_limits<std::uint64_t>::max() >> it->second)) {
    return bad("the size is too large");
  }
  return number << it->second;
}

std::string format_size(std::uint64_t bytes) {
  if (bytes == 0) return "0";
  for (auto [unit, shift] : {std::pair{'T', 40}, {'G', 30}, {'M', 20}, {'K', 10}}) {
    const std::uint64_t size = std::uint64_t{1} << shift;
    if (bytes % size == 0) return std::to_string(bytes / size) + unit;
  }
  return std::to_string(bytes);
}

BridgeConfig parse_config(std::string_view text, const std::string& file,
                          const LoadOptions& options) {
  toml::table root;
  try {
    root = toml::parse(text, file);
  } catch (const toml::parse_error& e) {
    throw ConfigError(file, static_cast<int>(e.source().begin.line), std::string(e.description()));
  }
  ConfigReader reader(file, options);
  return reader.read(root);
}

BridgeConfig load_config(const std::string& path, const LoadOptions& options) {
  std::error_code ec;
  fs::path absolute = fs::absolute(path, ec);
  const std::string file = ec ? path : absolute.lexically_normal().string();
  std::string content;
  try {
    content = read_small_file(file, kMaxConfigBytes);
  } catch (const FileReadError& e) {
    throw ConfigError(file, 0, "cannot read the configuration file: " + e.reason());
  }
  return parse_config(content, file, options);
}

}  // namespace kb::bridge
