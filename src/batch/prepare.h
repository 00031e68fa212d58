// From a parsed request to what the engine runs, and from the engine's
// result back to an OpenAI response body. Shared by `kvbatch run`, the
// server's batch worker and its online endpoints, so a request gives the
// same answer whichever way it came in.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>

#include "batch/request.h"
#include "engine/model.h"
#include "engine/types.h"
#include "util/status.h"

namespace kvb::batch {

// A request answered with an error instead of running (or after failing).
struct RequestFailure {
  int http_status = 400;
  std::string code;  // "invalid_request", "unsupported", "context_length_exceeded", "server_error"
  std::string message;
  std::string param;  // empty = null
};

// The {"error":{...}} body of a failure; type "server_error" for 5xx.
nlohmann::json FailureBody(const RequestFailure& f);

// Renders the chat template (chat endpoint; with tools, or tool calls in
// the history, through engine::RenderChat, whose grammar, triggers and
// reply parser the request carries), tokenizes, fills in
// max_tokens from `default_max_tokens` when the request gives none (0: leave
// it unlimited), carries n / logprobs over, and turns response_format into
// a grammar (engine::JsonSchemaToGrammar; a schema it cannot convert, or a
// grammar llama.cpp does not parse, is a 400 with param "response_format").
// `id` becomes engine::Request::id.
std::variant<engine::Request, RequestFailure> PrepareRequest(ParsedRequest&& req, const engine::Model& model,
                                                             int32_t default_max_tokens, uint64_t id);

// The failure for a request the engine could not run (Result::status).
RequestFailure FailureFromStatus(const Status& status);

// chat.completion or text_completion body for a finished request: every
// choice, with logprobs in the endpoint's shape when the request asked.
nlohmann::json ResponseBody(Endpoint endpoint, const engine::Result& r, std::string_view model_name, int64_t created);

}  // namespace kvb::batch
