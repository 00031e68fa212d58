// Shared by the route files: replies, errors and body parsing in OpenAI's shapes.
#pragma once

#include <httplib.h>

#include <nlohmann/json.hpp>
#include <string_view>

#include "api/server.h"

namespace kvb::api {

void SendJson(httplib::Response& res, int status, const nlohmann::json& body);
// {"error":{"message","type","param","code"}} with the type implied by the status.
void SendError(httplib::Response& res, int status, std::string_view message, std::string_view code = {},
               std::string_view param = {});
// The HTTP status for a store/worker Status (404 NotFound, 400 InvalidArgument, 409 FailedPrecondition, ...).
int HttpStatus(const Status& s);
void SendStatus(httplib::Response& res, const Status& s);
// The `limit` query parameter: an integer in [1, max], `def` when absent. On
// a malformed value sends a 400 and returns false.
bool LimitParam(const httplib::Request& req, httplib::Response& res, int def, int max, int* out);
// Parses a JSON object body; on failure sends a 400 and returns false.
bool ParseObjectBody(const httplib::Request& req, httplib::Response& res, nlohmann::json* out);

void AddFileRoutes(httplib::Server& http, Context& ctx);
void AddBatchRoutes(httplib::Server& http, Context& ctx);
void AddCompletionRoutes(httplib::Server& http, Context& ctx);

}  // namespace kvb::api
