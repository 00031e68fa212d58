#include "api/server.h"

#include <cerrno>
#include <cctype>
#include <cstdlib>
#include <ctime>

#include "api/routes.h"
#include "batch/limits.h"
#include "batch/response.h"

namespace kvb::api {

using nlohmann::json;

void SendJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(batch::DumpJson(body), "application/json");
}

void SendError(httplib::Response& res, int status, std::string_view message, std::string_view code,
               std::string_view param) {
  std::string_view type = status >= 500 ? "server_error"
                          : status == 401 ? "authentication_error"
                          : status == 429 ? "requests"
                          : status == 404 ? "not_found_error"
                                          : "invalid_request_error";
  SendJson(res, status, batch::ErrorBody(message, type, param, code));
}

int HttpStatus(const Status& s) {
  switch (s.code()) {
    case StatusCode::kInvalidArgument: return 400;
    case StatusCode::kNotFound: return 404;
    case StatusCode::kFailedPrecondition: return 409;
    case StatusCode::kResourceExhausted: return 413;
    default: return 500;
  }
}

void SendStatus(httplib::Response& res, const Status& s) {
  const int status = HttpStatus(s);
  SendError(res, status, s.message(), status == 404 ? "not_found" : status == 409 ? "conflict" : "");
}

bool LimitParam(const httplib::Request& req, httplib::Response& res, int def, int max, int* out) {
  *out = def;
  if (!req.has_param("limit")) return true;
  const std::string v = req.get_param_value("limit");
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n < 1 || n > max) {
    SendError(res, 400, "Invalid 'limit': expected an integer from 1 to " + std::to_string(max) + ".",
              "invalid_value", "limit");
    return false;
  }
  *out = static_cast<int>(n);
  return true;
}

bool ParseObjectBody(const httplib::Request& req, httplib::Response& res, json* out) {
  const int64_t max_body = batch::GetLimits().max_body_bytes;
  if (static_cast<int64_t>(req.body.size()) > max_body) {
    SendError(res, 413,
              "The request body has " + std::to_string(req.body.size()) + " bytes, over this server's limit of " +
                  std::to_string(max_body) + " bytes for JSON bodies (kvbatch serve --max-body-bytes).",
              "request_too_large");
    return false;
  }
  // JSON only: a form or text body is refused rather than guessed at
  // (clients that send no Content-Type at all are let through).
  if (req.has_header("Content-Type")) {
    std::string type = req.get_header_value("Content-Type");
    type = type.substr(0, type.find(';'));
    while (!type.empty() && type.back() == ' ') type.pop_back();
    for (char& c : type) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (type != "application/json") {
      SendError(res, 415,
                "Unsupported Content-Type '" + batch::ToValidUtf8(type.substr(0, 80)) +
                    "': send the body as application/json.",
                "unsupported_media_type");
      return false;
    }
  }
  // Nesting first, without recursion: a deep body is a 400, never a stack overflow.
  if (Status st = batch::CheckJsonDepth(req.body, batch::GetLimits().max_json_depth); !st.ok()) {
    SendError(res, 400, "The request body " + st.message() + ".", "json_too_deep");
    return false;
  }
  // nlohmann's lexer stops at a NUL byte: what follows would go unread.
  if (req.body.find('\0') != std::string::npos) {
    SendError(res, 400, "We could not parse the JSON body of your request: it contains a NUL byte.", "invalid_json");
    return false;
  }
  *out = json::parse(req.body, nullptr, false);
  if (out->is_discarded()) {
    SendError(res, 400, "We could not parse the JSON body of your request. Expected a JSON object.", "invalid_json");
    return false;
  }
  if (!out->is_object()) {
    SendError(res, 400, "The request body must be a JSON object.", "invalid_json");
    return false;
  }
  return true;
}

// Bodies other than uploads are read whole into memory, so they are checked
// before a byte of them is read: a declared length far over the limit is a 413,
// a body without a length (chunked) a 411, a compressed one a 415 (a small
// compressed body can inflate to any size). The connection is closed after
// such an answer: the unread body must not be taken for the next request.
static bool CheckBodyHeaders(const httplib::Request& req, httplib::Response& res, int64_t max_body) {
  const bool upload = req.method == "POST" && req.path == "/v1/files";
  if (upload) return true;
  auto refuse = [&](int status, const std::string& message, const char* code) {
    res.set_header("Connection", "close");
    SendError(res, status, message, code);
    return false;
  };
  const std::string te = req.get_header_value("Transfer-Encoding");
  if (!te.empty() && te != "identity")
    return refuse(411, "Send request bodies with a Content-Length (chunked bodies are only accepted for uploads).",
                  "length_required");
  const std::string ce = req.get_header_value("Content-Encoding");
  if (!ce.empty() && ce != "identity")
    return refuse(415, "Content-Encoding '" + batch::ToValidUtf8(ce.substr(0, 40)) + "' is not accepted for JSON bodies.",
                  "unsupported_content_encoding");
  if (req.has_header("Content-Length")) {
    const std::string v = req.get_header_value("Content-Length");
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno == ERANGE || v[0] == '-')
      return refuse(400, "Invalid Content-Length header.", "invalid_request");
    // Up to twice the limit the body is read and then refused (in
    // ParseObjectBody): a client still sending when the connection closes
    // would get a reset instead of the 413. Beyond that it is refused unread.
    if (n > 2 * static_cast<unsigned long long>(max_body))
      return refuse(413,
                    "The request body has " + v + " bytes, over this server's limit of " + std::to_string(max_body) +
                        " bytes for JSON bodies (kvbatch serve --max-body-bytes).",
                    "request_too_large");
  }
  return true;
}

Server::Server(Context context) : ctx_(std::move(context)), http_(std::make_unique<httplib::Server>()) {
  ctx_.started_at = static_cast<int64_t>(std::time(nullptr));
  httplib::Server& http = *http_;
  // A connection holds a thread while it is open (slow and streaming ones
  // too): many threads, each released after read_timeout_s of silence, so
  // slow or half-open clients cannot starve /health or anyone else.
  const int threads = std::max(8, ctx_.options.http_threads);
  http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  // Uploads are streamed to disk and checked against the limit as they come;
  // this only stops what is far over it before reading. JSON bodies are
  // limited before they are read (the pre-routing handler below).
  http.set_payload_max_length(static_cast<size_t>(ctx_.options.max_file_bytes) + (size_t{64} << 20));
  http.set_read_timeout(ctx_.options.read_timeout_s, 0);
  http.set_write_timeout(ctx_.options.write_timeout_s, 0);
  http.set_keep_alive_timeout(5);

  const std::string key = ctx_.options.api_key;
  const int64_t max_body = batch::GetLimits().max_body_bytes;
  http.set_pre_routing_handler([key, max_body](const httplib::Request& req, httplib::Response& res) {
    if (!CheckBodyHeaders(req, res, max_body)) return httplib::Server::HandlerResponse::Handled;
    // The API and the metrics need the key; the dashboard's page and assets
    // do not (they hold no data: the page asks for the key, see web/).
    const bool guarded = req.path.rfind("/v1/", 0) == 0 || req.path == "/metrics";
    if (key.empty() || !guarded) return httplib::Server::HandlerResponse::Unhandled;
    const std::string auth = req.get_header_value("Authorization");
    if (auth == "Bearer " + key) return httplib::Server::HandlerResponse::Unhandled;
    SendError(res, 401,
              auth.empty() ? "You didn't provide an API key. Provide it in the Authorization header as 'Bearer KEY'."
                           : "Incorrect API key provided.",
              "invalid_api_key");
    return httplib::Server::HandlerResponse::Handled;
  });
  // Statuses set without a body (unknown routes, httplib's own 413/400).
  http.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    if (res.status == 404) {
      SendError(res, 404, "Unknown request URL: " + req.method + " " + req.path + ".", "unknown_url");
    } else if (res.status == 413) {
      SendError(res, 413, "The request is larger than this server accepts.", "request_too_large");
    } else if (res.status == 405) {
      SendError(res, 405, "Method " + req.method + " is not allowed for " + req.path + ".", "method_not_allowed");
    } else {
      SendError(res, res.status, "The request could not be processed.", "");
    }
    return httplib::Server::HandlerResponse::Handled;
  }));
  // A request refused before its body was read to the end (an upload that is
  // not multipart, a header too large, httplib's own refusals) leaves bytes
  // on the connection that must not be read as the next request: the client
  // is told to close it.
  http.set_post_routing_handler([](const httplib::Request& req, httplib::Response& res) {
    const bool has_body = req.has_header("Transfer-Encoding") ||
                          (req.has_header("Content-Length") && req.get_header_value("Content-Length") != "0");
    if (res.status >= 400 && has_body && res.get_header_value("Content-Type").rfind("text/event-stream", 0) != 0)
      res.set_header("Connection", "close");
  });
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    SendError(res, 500, what, "server_error");
  });

  http.Get("/health", [](const httplib::Request&, httplib::Response& res) { SendJson(res, 200, {{"status", "ok"}}); });
  auto model_object = [this](const std::string& id) {
    return json{{"id", id}, {"object", "model"}, {"created", ctx_.started_at}, {"owned_by", "kvbatch"}};
  };
  // Every model this node serves (several with a router; an API node without a model lists none).
  auto names = [this] {
    std::vector<std::string> out;
    if (ctx_.router)
      for (const auto& s : ctx_.router->specs()) out.push_back(s.name);
    else if (ctx_.model)
      out.push_back(ctx_.model->name());
    return out;
  };
  http.Get("/v1/models", [model_object, names](const httplib::Request&, httplib::Response& res) {
    json data = json::array();
    for (const std::string& n : names()) data.push_back(model_object(n));
    SendJson(res, 200, {{"object", "list"}, {"data", std::move(data)}});
  });
  http.Get(R"(/v1/models/([^/]+))", [model_object, names](const httplib::Request& req, httplib::Response& res) {
    for (const std::string& n : names())
      if (req.matches[1] == n) return SendJson(res, 200, model_object(n));
    SendError(res, 404, "The model '" + req.matches[1].str() + "' does not exist.", "model_not_found", "model");
  });
  AddFileRoutes(http, ctx_);
  AddBatchRoutes(http, ctx_);
  AddCompletionRoutes(http, ctx_);
  AddMonitorRoutes(http, ctx_);
  AddWebRoutes(http, ctx_);
  if (ctx_.metrics != nullptr)
    http.set_logger([m = ctx_.metrics](const httplib::Request&, const httplib::Response& res) {
      m->ObserveHttp(res.status);
    });
}

Server::~Server() = default;

Status Server::Bind() {
  if (ctx_.options.port == 0) {
    port_ = http_->bind_to_any_port(ctx_.options.host);
    if (port_ <= 0) return Status::IoError("cannot bind " + ctx_.options.host);
    return Status::Ok();
  }
  if (!http_->bind_to_port(ctx_.options.host, ctx_.options.port))
    return Status::IoError("cannot listen on " + ctx_.options.host + ":" + std::to_string(ctx_.options.port) +
                           " (in use?)");
  port_ = ctx_.options.port;
  return Status::Ok();
}

Status Server::Run() {
  if (!http_->listen_after_bind()) return Status::IoError("the HTTP server stopped with an error");
  return Status::Ok();
}

void Server::Stop() {
  {
    std::lock_guard<std::mutex> lock(ctx_.stop->mu);
    ctx_.stop->stopping = true;
  }
  ctx_.stop->cv.notify_all();
  http_->stop();
}

metrics::DriverSample DriverSampleOf(const worker::RunnerStats& s) {
  return {s.chunks_claimed, s.chunks_lost, s.results_committed, s.results_dropped, s.errors_by_code};
}

metrics::EngineSnapshot RouterSnapshot(worker::ModelRouter& router, int index) {
  if (auto hub = router.LoadedHub(index)) return Snapshot(*hub);
  metrics::EngineSnapshot s;
  s.model = router.specs()[static_cast<size_t>(index)].name;
  s.device = "not loaded";
  return s;
}

metrics::EngineSnapshot Snapshot(const worker::EngineHub& hub) {
  metrics::EngineSnapshot s;
  s.model = hub.model_name();
  s.device = hub.info().device;
  s.stats = hub.Stats();
  s.max_seqs = hub.max_seqs();
  s.kv_bytes = hub.info().kv_bytes;
  size_t free = 0, total = 0;
  hub.DeviceMemory(&free, &total);
  s.memory_free = free;
  s.memory_total = total;
  return s;
}

}  // namespace kvb::api
