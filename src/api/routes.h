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

// Holds one of `max` places while a long request runs (online completions,
// event streams; a stream releases it when it ends).
class CountedSlot {
 public:
  CountedSlot(std::shared_ptr<std::atomic<int>> count, int max) : count_(std::move(count)) {
    ok_ = count_->fetch_add(1) < max;
  }
  ~CountedSlot() { count_->fetch_sub(1); }
  CountedSlot(const CountedSlot&) = delete;
  CountedSlot& operator=(const CountedSlot&) = delete;
  bool ok() const { return ok_; }

 private:
  std::shared_ptr<std::atomic<int>> count_;
  bool ok_ = false;
};

void AddFileRoutes(httplib::Server& http, Context& ctx);
void AddBatchRoutes(httplib::Server& http, Context& ctx);
void AddCompletionRoutes(httplib::Server& http, Context& ctx);
// /metrics, /v1/engines and /v1/batches/{id}/events (monitor_routes.cc).
void AddMonitorRoutes(httplib::Server& http, Context& ctx);
// The dashboard: `/` and its assets (web_routes.cc). Registered last: its
// pattern must not shadow the API's routes.
void AddWebRoutes(httplib::Server& http, Context& ctx);

}  // namespace kvb::api
