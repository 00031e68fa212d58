// Watching a node work: GET /metrics (Prometheus), GET /v1/engines (the
// dashboard's engine panel) and GET /v1/batches/{id}/events (a batch's
// progress as server-sent events).
#include <chrono>

#include "api/objects.h"
#include "api/routes.h"
#include "batch/response.h"
#include "store/batch_status.h"

namespace kvb::api {

using nlohmann::json;

namespace {

json EngineObject(size_t index, const metrics::EngineSnapshot& s) {
  const engine::EngineStats& st = s.stats;
  return json{{"index", index},
              {"model", s.model},
              {"device", s.device},
              {"max_seqs", s.max_seqs},
              {"kv_cells", st.cells_total},
              {"kv_cells_used", st.cells_used},
              {"kv_cells_reserved", st.cells_reserved},
              {"kv_cells_peak", st.cells_peak},
              {"kv_bytes", s.kv_bytes},
              {"running", st.active},
              {"waiting", st.waiting},
              {"anchors", st.anchors},
              {"device_memory_total", s.memory_total},
              {"device_memory_used", s.memory_total - std::min(s.memory_free, s.memory_total)},
              {"prompt_tokens", st.prompt_tokens},
              {"cached_tokens", st.cached_tokens},
              {"prefill_tokens", st.prefill_tokens},
              {"generation_tokens", st.completion_tokens},
              {"requests_done", st.requests_done},
              {"requests_failed", st.requests_failed},
              {"steps", st.steps}};
}

// One batch's event stream: the batch object at once, then when its status
// changes (looked at four times a second) and at least every second, until
// it ends, the client goes or the server stops.
struct EventStream {
  Context* ctx;
  std::string id;
  std::shared_ptr<CountedSlot> slot;
  std::string last_status;
  int64_t sent = 0;
  std::chrono::steady_clock::time_point last_sent;

  // httplib's content provider: false drops the connection (the client is
  // gone); sink.done() ends the stream properly.
  bool Next(httplib::DataSink& sink) {
    using namespace std::chrono;
    if (sent > 0) {
      // Wait for the next look, waking at once when the server stops.
      std::unique_lock<std::mutex> lock(ctx->stop->mu);
      if (ctx->stop->cv.wait_for(lock, milliseconds(250), [&] { return ctx->stop->stopping; })) {
        sink.done();
        return true;
      }
    }
    if (!sink.is_writable()) return false;
    auto b = ctx->store->GetBatch(id);
    if (!b.ok()) {
      if (b.status().code() == StatusCode::kNotFound) {  // deleted meanwhile
        sink.done();
        return true;
      }
      return true;  // the store is away for a moment: look again
    }
    const std::string status(store::ToString(b->status));
    const bool changed = status != last_status;
    if (!changed && steady_clock::now() - last_sent < milliseconds(950)) return true;
    const std::string event = "id: " + std::to_string(++sent) + "\nevent: batch\ndata: " +
                              batch::DumpJson(BatchObject(*b, ctx->driver->Progress(id))) + "\n\n";
    last_status = status;
    last_sent = steady_clock::now();
    if (!sink.write(event.data(), event.size())) return false;
    if (store::IsFinal(b->status)) sink.done();
    return true;
  }
};

}  // namespace

void AddMonitorRoutes(httplib::Server& http, Context& ctx) {
  http.Get("/metrics", [&ctx](const httplib::Request&, httplib::Response& res) {
    if (ctx.metrics == nullptr) return SendError(res, 404, "This node exports no metrics.", "not_found");
    res.set_content(ctx.metrics->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });

  http.Get("/v1/engines", [&ctx](const httplib::Request&, httplib::Response& res) {
    json data = json::array();
    for (size_t i = 0; i < ctx.engines.size(); ++i) data.push_back(EngineObject(i, Snapshot(*ctx.engines[i])));
    if (ctx.router)
      for (int i = 0; i < static_cast<int>(ctx.router->specs().size()); ++i)
        data.push_back(EngineObject(static_cast<size_t>(i), RouterSnapshot(*ctx.router, i)));
    const int64_t now = static_cast<int64_t>(std::time(nullptr));
    json node = {{"rss_bytes", metrics::ResidentBytes()},
                 {"uptime_seconds", now - ctx.started_at},
                 {"online_requests", ctx.online_requests->load()}};
    SendJson(res, 200, {{"object", "list"}, {"data", std::move(data)}, {"node", std::move(node)}});
  });

  http.Get(R"(/v1/batches/([^/]+)/events)", [&ctx](const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1].str();
    if (auto b = ctx.store->GetBatch(id); !b.ok()) {
      if (b.status().code() == StatusCode::kNotFound)
        return SendError(res, 404, "No such Batch object: " + batch::ToValidUtf8(id.substr(0, 80)), "not_found", "id");
      return SendStatus(res, b.status());
    }
    auto slot = std::make_shared<CountedSlot>(ctx.event_streams, ctx.options.max_event_streams);
    if (!slot->ok())
      return SendError(res, 429,
                       "Too many event streams at once (this server serves at most " +
                           std::to_string(ctx.options.max_event_streams) + "). Close one, or poll the batch.",
                       "rate_limit_exceeded");
    auto stream = std::make_shared<EventStream>(EventStream{&ctx, id, std::move(slot), "", 0, {}});
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");  // proxies: pass each event on at once
    res.set_chunked_content_provider("text/event-stream",
                                     [stream](size_t, httplib::DataSink& sink) { return stream->Next(sink); });
  });
}

}  // namespace kvb::api
