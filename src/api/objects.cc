#include "api/objects.h"

#include <cmath>

namespace kvb::api {

using nlohmann::json;

namespace {

json TimeOrNull(int64_t t) { return t > 0 ? json(t) : json(nullptr); }
json IdOrNull(const std::string& id) { return id.empty() ? json(nullptr) : json(id); }

json Rounded(double v, double scale) { return std::round(v * scale) / scale; }

}  // namespace

json FileObject(const store::FileRecord& f) {
  return json{{"id", f.id},
              {"object", "file"},
              {"bytes", f.bytes},
              {"created_at", f.created_at},
              {"expires_at", TimeOrNull(f.expires_at)},
              {"filename", f.filename},
              {"purpose", f.purpose},
              {"status", "processed"},
              {"status_details", nullptr}};
}

json BatchObject(const store::BatchRecord& b, const std::optional<worker::BatchProgress>& progress) {
  json errors = nullptr;
  if (!b.errors.empty()) {
    json data = json::array();
    for (const auto& e : b.errors)
      data.push_back({{"code", e.code},
                      {"message", e.message},
                      {"param", e.param.empty() ? json(nullptr) : json(e.param)},
                      {"line", e.line > 0 ? json(e.line) : json(nullptr)}});
    errors = {{"object", "list"}, {"data", std::move(data)}};
  }
  json metadata = nullptr;
  if (!b.metadata_json.empty()) metadata = json::parse(b.metadata_json, nullptr, false);
  if (metadata.is_discarded()) metadata = nullptr;

  json ext = {{"priority", b.priority}, {"paused", b.paused}};
  const int64_t answered = b.counts.completed + b.counts.failed;
  ext["progress"] = b.counts.total > 0 ? Rounded(static_cast<double>(answered) / b.counts.total, 1e4) : json(nullptr);
  ext["prefix_cache_hit_rate"] = b.usage.input_tokens > 0
                                     ? Rounded(static_cast<double>(b.usage.cached_tokens) / b.usage.input_tokens, 1e4)
                                     : json(nullptr);
  ext["requests_per_second"] = nullptr;
  ext["tokens_per_second"] = nullptr;
  ext["eta_seconds"] = nullptr;
  ext["in_flight"] = 0;
  if (progress) {
    ext["requests_per_second"] = Rounded(progress->requests_per_second, 100);
    ext["tokens_per_second"] = Rounded(progress->tokens_per_second, 10);
    if (progress->eta_seconds >= 0) ext["eta_seconds"] = Rounded(progress->eta_seconds, 10);
    ext["in_flight"] = progress->in_flight;
  }

  return json{
      {"id", b.id},
      {"object", "batch"},
      {"endpoint", b.endpoint},
      {"errors", std::move(errors)},
      {"input_file_id", b.input_file_id},
      {"completion_window", b.completion_window},
      {"status", store::ToString(b.status)},
      {"output_file_id", IdOrNull(b.output_file_id)},
      {"error_file_id", IdOrNull(b.error_file_id)},
      {"created_at", b.created_at},
      {"in_progress_at", TimeOrNull(b.in_progress_at)},
      {"expires_at", TimeOrNull(b.expires_at)},
      {"finalizing_at", TimeOrNull(b.finalizing_at)},
      {"completed_at", TimeOrNull(b.completed_at)},
      {"failed_at", TimeOrNull(b.failed_at)},
      {"expired_at", TimeOrNull(b.expired_at)},
      {"cancelling_at", TimeOrNull(b.cancelling_at)},
      {"cancelled_at", TimeOrNull(b.cancelled_at)},
      {"request_counts", {{"total", b.counts.total}, {"completed", b.counts.completed}, {"failed", b.counts.failed}}},
      {"metadata", std::move(metadata)},
      {"usage",
       {{"input_tokens", b.usage.input_tokens},
        {"input_tokens_details", {{"cached_tokens", b.usage.cached_tokens}}},
        {"output_tokens", b.usage.output_tokens},
        {"output_tokens_details", {{"reasoning_tokens", 0}}},
        {"total_tokens", b.usage.input_tokens + b.usage.output_tokens}}},
      {"kvbatch", std::move(ext)},
  };
}

json ListObject(json data, bool has_more) {
  json first = nullptr, last = nullptr;
  if (!data.empty()) {
    first = data.front()["id"];
    last = data.back()["id"];
  }
  return json{{"object", "list"}, {"data", std::move(data)}, {"first_id", first}, {"last_id", last}, {"has_more", has_more}};
}

}  // namespace kvb::api
