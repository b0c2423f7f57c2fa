#pragma once
// The control API's wire forms (docs/control-api.md): the JSON it answers with (kernels,
// resources, credentials, errors), the request bodies it reads, and its RFC 3339 UTC time stamps
// (the kernelspec wrapper stamps its progress lines with them too). Pure, thread-safe functions.
#include <boost/beast/http/status.hpp>
#include <chrono>
#include <cstddef>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "auth/credentials_store.hpp"
#include "bridge/kernel_service.hpp"

namespace kb::bridge {

// What a log line or an error message quotes of a request's path, ids, headers and fields.
inline constexpr std::size_t kQuoteLimit = 96;

// RFC 3339, UTC, milliseconds: "2026-11-26T16:00:00.000Z".
std::string format_time_utc(Clock::time_point t);
// RFC 3339 with an optional fraction and Z or ±hh:mm, years 1970 to 2199; nullopt otherwise.
std::optional<Clock::time_point> parse_time_utc(const std::string& text);

// An error a request gets back: status, a sentence, and the field / limit at fault.
struct ApiError {
  boost::beast::http::status status;
  std::string message;
  std::string field;
  std::string limit;
};

// {"error": message, "field": …, "limit": …} (field and limit only when set).
nlohmann::json error_body(const ApiError& e);
// The HTTP status and body for an error the KernelService reported.
ApiError from_service_error(const ServiceError& e);

// Serialises a response body. Text from a request is quoted with printable() before it gets here;
// replacing what is still not UTF-8 keeps a serializer exception from ever ending a session.
std::string dump_json(const nlohmann::json& body);

// A kernel as GET /v1/kernels/{id} shows it, and its "resources" object (only the fields set).
nlohmann::json resources_json(const ResourceRequest& r);
nlohmann::json kernel_json(const KernelView& v);
// A user's stored UNICORE token as GET/PUT /v1/users/{user}/credentials show it (never the token).
nlohmann::json credentials_json(const std::string& user, const auth::CredentialsStore::Info& info);

// "a string", "an object", …: how an error message names the JSON type a request sent.
std::string type_of(const nlohmann::json& j);

// Reads the fields of one JSON object, refusing unknown ones and wrong types (naming the field,
// with `prefix` and a dot before it when the object is nested, e.g. "resources.nodes").
class ObjectReader {
 public:
  ObjectReader(const nlohmann::json& object, std::string prefix)
      : object_(object), prefix_(std::move(prefix)) {}

  // An error for the first key not in `known` (with a guess at the one meant).
  std::optional<ApiError> check_known(const std::vector<std::string>& known) const;
  std::string field(const std::string& key) const;
  // The key's value, or nullptr when it is absent or null.
  const nlohmann::json* get(const std::string& key) const;
  ApiError wrong_type(const std::string& key, const std::string& expected) const;

  // A non-empty string without control characters, if the key is there.
  std::optional<ApiError> string(const std::string& key, std::optional<std::string>& out) const;
  // An integer in [min, max], if the key is there.
  std::optional<ApiError> integer(const std::string& key, std::optional<int>& out, long min,
                                  long max) const;

 private:
  const nlohmann::json& object_;
  std::string prefix_;
};

// The create request's "resources" and "connection" (Jupyter's connection file) objects.
std::optional<ApiError> parse_resources(const nlohmann::json& j, ResourceRequest& r);
std::optional<ApiError> parse_connection(const nlohmann::json& j, HubConnection& c);

// The body of PUT /v1/users/{user}/credentials. It holds a secret: no error quotes the token.
struct CredentialsUpdate {
  std::string token;
  std::optional<Clock::time_point> expires_at;
};
std::variant<CredentialsUpdate, ApiError> parse_credentials(const std::string& body);

}  // namespace kb::bridge
