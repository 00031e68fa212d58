// Online /v1/chat/completions and /v1/completions, plain and streaming (SSE).
// They share the engine with batch work and go ahead of it in the queue.
#include <condition_variable>
#include <ctime>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "api/connection.h"
#include "api/routes.h"
#include "batch/prepare.h"
#include "batch/request.h"
#include "batch/response.h"
#include "batch/tool_stream.h"

namespace kvb::api {

using nlohmann::json;

namespace {

// What the engine thread hands to the HTTP thread of one request.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<int32_t, std::string>> deltas;  // (choice, text)
  std::optional<engine::Result> result;

  worker::RequestCallbacks Callbacks(const std::shared_ptr<Channel>& self) {
    worker::RequestCallbacks cb;
    cb.on_delta = [self](int32_t choice, std::string_view text) {
      {
        std::lock_guard<std::mutex> lock(self->mu);
        self->deltas.emplace_back(choice, std::string(text));
      }
      self->cv.notify_all();
    };
    cb.on_result = [self](engine::Result&& r) {
      {
        std::lock_guard<std::mutex> lock(self->mu);
        self->result = std::move(r);
      }
      self->cv.notify_all();
    };
    return cb;
  }
};

std::string Event(const json& j) { return "data: " + batch::DumpJson(j) + "\n\n"; }

void Complete(Context& ctx, batch::Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
  if (ctx.hub == nullptr && ctx.router == nullptr)
    return SendError(res, 503,
                     "This node has no model: it keeps batches only. Send online requests to a node started with "
                     "-m (kvbatch serve -m MODEL --store ...).",
                     "no_model_loaded");
  auto slot = std::make_shared<CountedSlot>(ctx.online_requests, ctx.options.max_online_requests);
  if (!slot->ok())
    return SendError(res, 429,
                     "Too many online requests at once (this server runs at most " +
                         std::to_string(ctx.options.max_online_requests) +
                         "; kvbatch serve --max-online-requests). Retry shortly, or submit a batch.",
                     "rate_limit_exceeded");
  json body;
  if (!ParseObjectBody(req, res, &body)) return;
  bool stream = false;
  bool include_usage = false;
  if (auto it = body.find("stream"); it != body.end() && !it->is_null()) {
    if (!it->is_boolean()) return SendError(res, 400, "Invalid type for 'stream': expected a boolean.", "invalid_type", "stream");
    stream = it->get<bool>();
  }
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object())
      return SendError(res, 400, "Invalid type for 'stream_options': expected an object.", "invalid_type",
                       "stream_options");
    auto u = it->find("include_usage");
    if (u != it->end() && !u->is_null() && !u->is_boolean())
      return SendError(res, 400, "Invalid type for 'stream_options.include_usage': expected a boolean.",
                       "invalid_type", "stream_options.include_usage");
    include_usage = u != it->end() && u->is_boolean() && u->get<bool>();
  }
  if (stream && endpoint == batch::Endpoint::kEmbeddings)
    return SendError(res, 400, "Embeddings are not streamed: 'stream' must be false or absent.", "invalid_value",
                     "stream");
  // The same parser and checks as a batch line, so both give the same answer.
  const std::string request_id = batch::NewId("req_");
  // The body's own text, not a re-serialized copy: nlohmann::json sorts keys,
  // and a json_schema's property order is the order its grammar generates.
  const std::string line = "{\"custom_id\":\"" + request_id + "\",\"method\":\"POST\",\"url\":\"" +
                           std::string(batch::EndpointPath(endpoint)) + "\",\"body\":" + req.body + "}";
  std::string param;
  auto parsed = batch::ParseRequest(line, &param);
  if (!parsed.ok()) {
    if (param.rfind("body.", 0) == 0) param.erase(0, 5);
    return SendError(res, 400, parsed.status().message(), "invalid_request", param);
  }
  // Several models: the body's "model" picks one (loaded if need be); held
  // until the answer is sent, so it is not unloaded under the request.
  std::shared_ptr<worker::EngineHub> hold;
  worker::EngineHub* hub = ctx.hub;
  const engine::Model* served = ctx.model;
  if (ctx.router) {
    auto acquired = ctx.router->Acquire(parsed->model);
    if (auto* f = std::get_if<batch::RequestFailure>(&acquired))
      return SendError(res, f->http_status, f->message, f->code, f->param);
    hold = std::get<std::shared_ptr<worker::EngineHub>>(std::move(acquired));
    hub = hold.get();
    served = hub->model();
  }
  const uint64_t id = hub->NextId();
  auto prepared = batch::PrepareRequest(std::move(parsed).value(), *served, ctx.options.default_max_tokens, id);
  if (auto* f = std::get_if<batch::RequestFailure>(&prepared))
    return SendJson(res, f->http_status, batch::FailureBody(*f));
  engine::Request er = std::get<engine::Request>(std::move(prepared));
  er.stream = stream;
  const int32_t n_choices = std::max<int32_t>(1, er.n);
  // A tools request streams its text as it parses: content and tool calls.
  auto tool_streams = std::make_shared<std::vector<batch::ToolStream>>();
  if (stream && er.reply_parser)
    for (int32_t i = 0; i < n_choices; ++i) tool_streams->emplace_back(er.reply_parser);

  auto ch = std::make_shared<Channel>();
  hub->Submit(std::move(er), ch->Callbacks(ch), /*urgent=*/true);
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  const std::string model = served->name();

  if (!stream) {
    // Nothing is written until the answer is there, so a client that goes
    // away is noticed by watching its socket: its request is cancelled.
    const ConnectionWatch watch(req);
    std::unique_lock<std::mutex> lock(ch->mu);
    while (!ch->cv.wait_for(lock, std::chrono::milliseconds(250), [&] { return ch->result.has_value(); })) {
      if (!watch.Gone()) continue;
      lock.unlock();
      hub->Cancel(id);
      lock.lock();
      ch->cv.wait(lock, [&] { return ch->result.has_value(); });
      return;  // nobody to answer
    }
    const engine::Result& r = *ch->result;
    if (!r.status.ok()) {
      batch::RequestFailure f = batch::FailureFromStatus(r.status);
      return SendJson(res, f.http_status, batch::FailureBody(f));
    }
    return SendJson(res, 200, batch::ResponseBody(endpoint, r, model, created));
  }

  const bool chat = endpoint == batch::Endpoint::kChatCompletions;
  const std::string chunk_id = batch::NewId(chat ? "chatcmpl-" : "cmpl-");
  auto chunk = [=](json choice) {
    json c = {{"id", chunk_id},
              {"object", chat ? "chat.completion.chunk" : "text_completion"},
              {"created", created},
              {"model", model},
              {"system_fingerprint", nullptr},
              {"choices", json::array({std::move(choice)})}};
    return c;
  };
  auto content = [=](int32_t index, const std::string& text, json finish) {
    if (chat)
      return json{{"index", index},
                  {"delta", text.empty() && !finish.is_null() ? json::object() : json{{"content", text}}},
                  {"logprobs", nullptr},
                  {"finish_reason", std::move(finish)}};
    return json{{"index", index}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", std::move(finish)}};
  };
  auto started = std::make_shared<bool>(false);
  auto finished = std::make_shared<bool>(false);
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [=](size_t, httplib::DataSink& sink) {
        std::string out;
        if (!*started && chat) {
          *started = true;
          for (int32_t i = 0; i < n_choices; ++i)
            out += Event(chunk({{"index", i},
                                {"delta", {{"role", "assistant"}, {"content", ""}, {"refusal", nullptr}}},
                                {"logprobs", nullptr},
                                {"finish_reason", nullptr}}));
        }
        std::deque<std::pair<int32_t, std::string>> deltas;
        std::optional<engine::Result> result;
        {
          std::unique_lock<std::mutex> lock(ch->mu);
          ch->cv.wait_for(lock, std::chrono::seconds(15), [&] { return !ch->deltas.empty() || ch->result; });
          deltas.swap(ch->deltas);
          if (ch->result) result = std::move(ch->result);
        }
        for (const auto& [choice, d] : deltas) {
          if (tool_streams->empty()) {
            out += Event(chunk(content(choice, batch::ToValidUtf8(d), nullptr)));
            continue;
          }
          for (json& delta : (*tool_streams)[static_cast<size_t>(choice)].Add(d))
            out += Event(chunk({{"index", choice}, {"delta", std::move(delta)}, {"logprobs", nullptr}, {"finish_reason", nullptr}}));
        }
        if (result && result->status.ok() && !tool_streams->empty()) {
          // The complete answers, read in full: what the partial reads held back.
          for (size_t i = 0; i < result->choices.size() && i < tool_streams->size(); ++i) {
            if (result->choices[i].finish != engine::FinishReason::kStop) continue;
            for (json& delta : (*tool_streams)[i].Add("", /*final=*/true))
              out += Event(chunk({{"index", i}, {"delta", std::move(delta)}, {"logprobs", nullptr}, {"finish_reason", nullptr}}));
          }
        }
        if (result) {
          *finished = true;
          if (!result->status.ok()) {
            batch::RequestFailure f = batch::FailureFromStatus(result->status);
            out += Event(batch::FailureBody(f));
          } else {
            json full = batch::ResponseBody(endpoint, *result, model, created);
            for (const json& c : full["choices"])
              out += Event(chunk(content(c["index"].get<int32_t>(), "", c["finish_reason"])));
            if (include_usage) {
              json u = chunk(json::object());
              u["choices"] = json::array();
              u["usage"] = full["usage"];
              out += Event(u);
            }
          }
          out += "data: [DONE]\n\n";
        }
        if (out.empty()) out = ": keep-alive\n\n";  // SSE comment: notices a gone client
        if (!sink.write(out.data(), out.size())) return false;
        if (*finished) sink.done();
        return true;
      },
      [=](bool) {
        (void)slot;  // held until the stream ends
        (void)hold;  // and the model with it
        // The client went away before the end: stop generating for it.
        if (!*finished) hub->Cancel(id);
      });
}

}  // namespace

void AddCompletionRoutes(httplib::Server& http, Context& ctx) {
  http.Post("/v1/chat/completions", [&ctx](const httplib::Request& req, httplib::Response& res) {
    Complete(ctx, batch::Endpoint::kChatCompletions, req, res);
  });
  http.Post("/v1/completions", [&ctx](const httplib::Request& req, httplib::Response& res) {
    Complete(ctx, batch::Endpoint::kCompletions, req, res);
  });
  http.Post("/v1/embeddings", [&ctx](const httplib::Request& req, httplib::Response& res) {
    Complete(ctx, batch::Endpoint::kEmbeddings, req, res);
  });
}

}  // namespace kvb::api
