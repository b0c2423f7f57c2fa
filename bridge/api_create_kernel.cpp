// POST /v1/kernels, in three steps: read the request (site, kernel, resources, connection, name,
// lease, tags; the first error found is the answer), validate it against the site's limits and the
// caller's kernel count, then submit it to the KernelService and answer 201 with the kernel.
#include <algorithm>
#include <boost/beast/http/field.hpp>

#include "bridge/control_api_impl.hpp"
#include "common/text.hpp"

namespace kb::bridge {
namespace {

namespace http = boost::beast::http;
using json = nlohmann::json;

// The body as a JSON object, or what is wrong with it.
std::variant<json, ApiError> parse_body(const std::string& text) {
  json body;
  try {
    body = json::parse(text);
  } catch (const json::parse_error& e) {
    return ApiError{http::status::bad_request,
                    "the body is not valid JSON (at byte " + std::to_string(e.byte) + ")",
                    {},
                    {}};
  } catch (const json::exception& e) {
    // E.g. a number too large for a double (1e400): valid JSON text, but no value we can hold.
    return ApiError{http::status::bad_request,
                    "the body holds a number out of range (" + printable(e.what()) + ")",
                    {},
                    {}};
  }
  if (!body.is_object())
    return ApiError{http::status::bad_request, "the body must be a JSON object", {}, {}};
  return body;
}

// "site": a [[site]] of the configuration (an unknown one gets a guess or the list).
std::optional<ApiError> read_site(const BridgeConfig& config, const ObjectReader& in,
                                  const SiteConfig*& site) {
  std::optional<std::string> site_name;
  if (auto e = in.string("site", site_name)) return e;
  if (!site_name) return ApiError{http::status::bad_request, "site is required", "site", {}};
  site = config.find_site(*site_name);
  if (site) return std::nullopt;
  std::string list;
  std::vector<std::string> names;
  for (const auto& s : config.sites) {
    list += (list.empty() ? "" : ", ") + s.name;
    names.push_back(s.name);
  }
  std::string message = "unknown site \"" + printable(*site_name, kQuoteLimit) + "\"";
  const std::string guess = closest_match(*site_name, names);
  message +=
      guess.empty() ? " (configured sites: " + list + ")" : " (did you mean \"" + guess + "\"?)";
  return ApiError{http::status::unprocessable_entity, message, "site", {}};
}

// "kernel_argv": the kernel's own command line, with {connection_file} in it.
std::optional<ApiError> read_kernel_argv(const json& argv, KernelRequest& request) {
  if (!argv.is_array() || argv.empty())
    return ApiError{http::status::bad_request,
                    "kernel_argv must be a non-empty array of strings",
                    "kernel_argv",
                    {}};
  bool placeholder = false;
  for (const auto& a : argv) {
    if (!a.is_string())
      return ApiError{
          http::status::bad_request, "kernel_argv must contain only strings", "kernel_argv", {}};
    request.kernel_argv.push_back(a.get<std::string>());
    placeholder =
        placeholder || request.kernel_argv.back().find("{connection_file}") != std::string::npos;
  }
  if (!placeholder) {
    return ApiError{http::status::bad_request,
                    "kernel_argv must contain \"{connection_file}\" where the kernel expects its "
                    "connection file",
                    "kernel_argv",
                    {}};
  }
  return std::nullopt;
}

// "kernel": one of the site's [site.kernels], by default its default_kernel.
std::optional<ApiError> choose_named_kernel(const SiteConfig& site,
                                            const std::optional<std::string>& kernel,
                                            KernelRequest& request) {
  if (!kernel && site.default_kernel.empty()) {
    return ApiError{http::status::bad_request,
                    "kernel is required (site " + site.name + " has no default_kernel)",
                    "kernel",
                    {}};
  }
  const std::string chosen = kernel ? *kernel : site.default_kernel;
  auto found = site.kernels.find(chosen);
  if (found == site.kernels.end()) {
    std::string list;
    for (const auto& [n, argv] : site.kernels) list += (list.empty() ? "" : ", ") + n;
    return ApiError{http::status::unprocessable_entity,
                    "site " + site.name + " has no kernel \"" + printable(chosen, kQuoteLimit) +
                        "\" (configured: " + (list.empty() ? "none" : list) + ")",
                    "kernel",
                    {}};
  }
  request.kernel_name = chosen;
  request.kernel_argv = found->second;
  return std::nullopt;
}

// What runs: either "kernel" (a name) or "kernel_argv" (a command line), not both.
std::optional<ApiError> read_kernel(const ObjectReader& in, const SiteConfig& site,
                                    KernelRequest& request) {
  std::optional<std::string> kernel;
  if (auto e = in.string("kernel", kernel)) return e;
  if (const json* argv = in.get("kernel_argv")) {
    if (kernel)
      return ApiError{http::status::bad_request,
                      "give either kernel or kernel_argv, not both",
                      "kernel_argv",
                      {}};
    return read_kernel_argv(*argv, request);
  }
  return choose_named_kernel(site, kernel, request);
}

// "tags": at most 32 labels, each a string.
std::optional<ApiError> read_tags(const ObjectReader& in, KernelRequest& request) {
  const json* tags = in.get("tags");
  if (!tags) return std::nullopt;
  if (!tags->is_object()) return in.wrong_type("tags", "an object of strings");
  if (tags->size() > 32) return ApiError{http::status::bad_request, "at most 32 tags", "tags", {}};
  for (auto it = tags->begin(); it != tags->end(); ++it) {
    if (!it.value().is_string()) {
      return ApiError{http::status::bad_request,
                      "tags." + printable(it.key(), kQuoteLimit) + " must be a string, not " +
                          type_of(it.value()),
                      "tags." + printable(it.key(), kQuoteLimit),
                      {}};
    }
    request.tags[it.key()] = it.value().get<std::string>();
  }
  return std::nullopt;
}

// Everything after the kernel: resources, connection (required), name, lease, tags.
std::optional<ApiError> read_kernel_options(const ObjectReader& in, KernelRequest& request) {
  if (const json* r = in.get("resources")) {
    if (auto e = parse_resources(*r, request.resources)) return e;
  }
  const json* connection = in.get("connection");
  if (!connection)
    return ApiError{http::status::bad_request,
                    "connection is required (the hub-side ports and key Jupyter chose)",
                    "connection",
                    {}};
  if (auto e = parse_connection(*connection, request.connection)) return e;
  std::optional<std::string> name;
  if (auto e = in.string("name", name)) return e;
  if (name) request.name = *name;
  std::optional<int> lease;
  if (auto e = in.integer("lease", lease, 5, 86400)) return e;
  if (lease) request.lease = std::chrono::seconds(*lease);
  return read_tags(in, request);
}

}  // namespace

void ControlApi::Impl::create_kernel(const Caller& caller, const std::string& text, Reply reply) {
  auto error = [&reply](const ApiError& e) { reply_error(reply, e); };
  auto body = parse_body(text);
  if (auto* e = std::get_if<ApiError>(&body)) return error(*e);
  KernelRequest request;
  const SiteConfig* site = nullptr;
  if (auto e = read_kernel_request(std::get<json>(body), request, site)) return error(*e);
  if (auto e = validate_kernel_request(caller, *site, request)) return error(*e);
  submit_kernel(caller, std::move(request), std::move(reply));
}

std::optional<ApiError> ControlApi::Impl::read_kernel_request(const json& body,
                                                              KernelRequest& request,
                                                              const SiteConfig*& site) const {
  ObjectReader in(body, "");
  if (auto e = in.check_known(
          {"site", "kernel", "kernel_argv", "resources", "connection", "name", "tags", "lease"}))
    return e;
  if (auto e = read_site(config, in, site)) return e;
  request.site = site->name;
  if (auto e = read_kernel(in, *site, request)) return e;
  return read_kernel_options(in, request);
}

std::optional<ApiError> ControlApi::Impl::validate_kernel_request(const Caller& caller,
                                                                  const SiteConfig& site,
                                                                  KernelRequest& request) const {
  apply_defaults(site, request.resources);
  if (auto violation = validate_request(site, request)) {
    return ApiError{http::status::unprocessable_entity, violation->message, violation->field,
                    violation->limit};
  }
  // The site's own word on the projects, where the bridge has it fresh (GET …/options asks).
  const auto& project = request.resources.project;
  if (project) {
    if (auto projects = kernels.known_projects(caller.user, site.name);
        projects && !projects->empty() &&
        std::find(projects->begin(), projects->end(), *project) == projects->end()) {
      std::string list;
      for (const auto& p : *projects) list += (list.empty() ? "" : ", ") + p;
      return ApiError{http::status::unprocessable_entity,
                      "project \"" + *project + "\" is not one user " + caller.user +
                          " may charge on site " + site.name + " (the site says: " + list + ")",
                      "resources.project", "projects"};
    }
  }
  if (config.max_kernels_per_user > 0) {
    int running = 0;
    for (const auto& v : kernels.list())
      running += (v.owner == caller.user && live(v.state)) ? 1 : 0;
    if (running >= config.max_kernels_per_user) {
      return ApiError{http::status::unprocessable_entity,
                      "you have " + std::to_string(running) +
                          " kernels running, the bridge's max_kernels_per_user is " +
                          std::to_string(config.max_kernels_per_user) + "; stop one first",
                      {},
                      "max_kernels_per_user"};
    }
  }
  return std::nullopt;
}

void ControlApi::Impl::submit_kernel(const Caller& caller, KernelRequest request, Reply reply) {
  kernels.create(caller, std::move(request),
                 [reply](std::variant<KernelView, ServiceError> result) {
                   if (auto* e = std::get_if<ServiceError>(&result)) {
                     const ApiError api = from_service_error(*e);
                     return reply(api.status, error_body(api), {});
                   }
                   const KernelView& view = std::get<KernelView>(result);
                   http::fields extra;
                   extra.set(http::field::location, "/v1/kernels/" + view.id);
                   reply(http::status::created, kernel_json(view), std::move(extra));
                 });
}

}  // namespace kb::bridge
