// Batches API: create, retrieve, list, cancel; pause and resume (extensions).
#include <ctime>
#include <regex>

#include "api/objects.h"
#include "api/routes.h"
#include "batch/request.h"
#include "batch/response.h"

namespace kvb::api {

using nlohmann::json;

namespace {

// "24h" (OpenAI's only value) or any N followed by s, m, h or d. Returns
// seconds, or 0 when malformed.
int64_t WindowSeconds(const std::string& w) {
  static const std::regex re(R"(([1-9][0-9]{0,6})([smhd]))");
  std::smatch m;
  if (!std::regex_match(w, m, re)) return 0;
  const int64_t n = std::stoll(m[1].str());
  switch (m[2].str()[0]) {
    case 's': return n;
    case 'm': return n * 60;
    case 'h': return n * 3600;
    default: return n * 86400;
  }
}

json Object(Context& ctx, const store::BatchRecord& b) { return BatchObject(b, ctx.driver->Progress(b.id)); }

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

// cancel, pause, resume: compare-and-set in the store (any node may serve
// them); the nodes running the batch see the change within a poll.
StatusOr<store::BatchRecord> Control(Context& ctx, const std::string& id, const std::string& action) {
  if (action == "cancel") {
    auto b = ctx.store->TransitionBatch(id, {store::BatchStatus::kValidating, store::BatchStatus::kInProgress},
                                        store::BatchStatus::kCancelling, Now());
    if (b.ok() || b.status().code() != StatusCode::kFailedPrecondition) return b;
    auto cur = ctx.store->GetBatch(id);
    if (!cur.ok()) return cur.status();
    if (cur->status == store::BatchStatus::kCancelling || cur->status == store::BatchStatus::kCancelled) return cur;
    return Status::FailedPrecondition("Cannot cancel a batch with status '" + std::string(ToString(cur->status)) +
                                      "'.");
  }
  auto b = ctx.store->SetBatchControl(id, action == "pause", std::nullopt);
  if (b.ok() || b.status().code() != StatusCode::kFailedPrecondition) return b;
  auto cur = ctx.store->GetBatch(id);
  if (!cur.ok()) return cur.status();
  return Status::FailedPrecondition("Cannot " + action + " a batch with status '" +
                                    std::string(ToString(cur->status)) + "'.");
}

void SendBatchStatus(httplib::Response& res, const std::string& id, const Status& st) {
  if (st.code() == StatusCode::kNotFound) return SendError(res, 404, "No such Batch object: " + id, "not_found", "id");
  SendStatus(res, st);
}

void CreateBatch(Context& ctx, const httplib::Request& req, httplib::Response& res) {
  json body;
  if (!ParseObjectBody(req, res, &body)) return;
  auto string_field = [&](const char* name, std::string* out) {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) {
      SendError(res, 400, std::string("Missing required parameter: '") + name + "'.", "missing_required_parameter",
                name);
      return false;
    }
    if (!it->is_string()) {
      SendError(res, 400, std::string("Invalid type for '") + name + "': expected a string.", "invalid_type", name);
      return false;
    }
    *out = it->get<std::string>();
    return true;
  };
  store::BatchRecord b;
  if (!string_field("input_file_id", &b.input_file_id) || !string_field("endpoint", &b.endpoint) ||
      !string_field("completion_window", &b.completion_window))
    return;
  if (!batch::EndpointFromPath(b.endpoint))
    return SendError(res, 400,
                     "Invalid value for 'endpoint': '" + batch::ToValidUtf8(b.endpoint) +
                         "'. Supported values are '/v1/chat/completions', '/v1/completions' and '/v1/embeddings'.",
                     "invalid_value", "endpoint");
  const int64_t window = WindowSeconds(b.completion_window);
  if (window == 0)
    return SendError(res, 400,
                     "Invalid value for 'completion_window': '" + batch::ToValidUtf8(b.completion_window) +
                         "'. Use '24h' (or a duration such as '90m', '2h', '7d').",
                     "invalid_value", "completion_window");
  if (auto it = body.find("metadata"); it != body.end() && !it->is_null()) {
    std::string param;
    if (Status st = batch::CheckMetadataValue(*it, &param); !st.ok())
      return SendError(res, 400, st.message(), "invalid_value", param);
    if (auto p = it->find("priority"); p != it->end()) {
      const std::string v = p->get<std::string>();
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < -1000 || n > 1000)
        return SendError(res, 400, "Invalid 'metadata.priority': expected an integer from -1000 to 1000, as a string.",
                         "invalid_value", "metadata.priority");
      b.priority = static_cast<int32_t>(n);
    }
    b.metadata_json = batch::DumpJson(*it);
  }
  auto file = ctx.store->GetFile(b.input_file_id);
  if (!file.ok())
    return SendError(res, 404, "No such File object: " + batch::ToValidUtf8(b.input_file_id), "not_found",
                     "input_file_id");
  if (file->purpose != "batch")
    return SendError(res, 400, "The input file must have purpose 'batch', not '" + file->purpose + "'.",
                     "invalid_file_purpose", "input_file_id");
  b.id = batch::NewId("batch_");
  b.status = store::BatchStatus::kValidating;
  b.created_at = static_cast<int64_t>(std::time(nullptr));
  b.expires_at = b.created_at + window;
  if (Status st = ctx.store->PutBatch(b); !st.ok()) return SendStatus(res, st);
  ctx.driver->Wake();
  SendJson(res, 200, Object(ctx, b));
}

}  // namespace

void AddBatchRoutes(httplib::Server& http, Context& ctx) {
  http.Post("/v1/batches", [&ctx](const httplib::Request& req, httplib::Response& res) { CreateBatch(ctx, req, res); });

  http.Get("/v1/batches", [&ctx](const httplib::Request& req, httplib::Response& res) {
    int limit = 0;
    if (!LimitParam(req, res, 20, 100, &limit)) return;
    const std::string after = req.get_param_value("after");
    // A cursor must name a batch: an unknown one is a mistake, not an empty page.
    if (!after.empty() && !ctx.store->GetBatch(after).ok())
      return SendError(res, 400, "Invalid 'after': no batch has the id '" + batch::ToValidUtf8(after.substr(0, 80)) + "'.",
                       "invalid_value", "after");
    auto batches = ctx.store->ListBatches(after, limit + 1);
    if (!batches.ok()) return SendStatus(res, batches.status());
    const bool more = static_cast<int>(batches->size()) > limit;
    if (more) batches->resize(static_cast<size_t>(limit));
    json data = json::array();
    for (const auto& b : *batches) data.push_back(Object(ctx, b));
    SendJson(res, 200, ListObject(std::move(data), more));
  });

  http.Get(R"(/v1/batches/([^/]+))", [&ctx](const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1].str();
    auto b = ctx.store->GetBatch(id);
    if (!b.ok()) return SendBatchStatus(res, id, b.status());
    SendJson(res, 200, Object(ctx, *b));
  });

  http.Post(R"(/v1/batches/([^/]+)/(cancel|pause|resume))", [&ctx](const httplib::Request& req,
                                                                   httplib::Response& res) {
    const std::string id = req.matches[1].str();
    const std::string action = req.matches[2].str();
    auto b = Control(ctx, id, action);
    if (!b.ok()) return SendBatchStatus(res, id, b.status());
    ctx.driver->Wake();
    SendJson(res, 200, Object(ctx, *b));
  });

  // Extension: {"priority": N}, N from -1000 to 1000; higher runs first.
  http.Post(R"(/v1/batches/([^/]+)/priority)", [&ctx](const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1].str();
    json body;
    if (!ParseObjectBody(req, res, &body)) return;
    auto p = body.find("priority");
    if (p == body.end() || !p->is_number_integer() || p->get<int64_t>() < -1000 || p->get<int64_t>() > 1000)
      return SendError(res, 400, "Invalid 'priority': expected an integer from -1000 to 1000.", "invalid_value",
                       "priority");
    auto b = ctx.store->SetBatchControl(id, std::nullopt, static_cast<int32_t>(p->get<int64_t>()));
    if (!b.ok() && b.status().code() == StatusCode::kFailedPrecondition)
      if (auto cur = ctx.store->GetBatch(id); cur.ok())
        b = Status::FailedPrecondition("Cannot change the priority of a batch with status '" +
                                       std::string(ToString(cur->status)) + "'.");
    if (!b.ok()) return SendBatchStatus(res, id, b.status());
    ctx.driver->Wake();
    SendJson(res, 200, Object(ctx, *b));
  });
}

}  // namespace kvb::api
