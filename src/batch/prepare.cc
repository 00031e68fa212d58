#include "batch/prepare.h"

#include "batch/embeddings.h"

#include <optional>
#include <utility>

#include "batch/response.h"
#include "engine/grammar.h"

namespace kvb::batch {

nlohmann::json FailureBody(const RequestFailure& f) {
  const char* type = f.http_status >= 500 ? "server_error" : "invalid_request_error";
  return ErrorBody(f.message, type, f.param, f.code);
}

std::variant<engine::Request, RequestFailure> PrepareRequest(ParsedRequest&& req, const engine::Model& model,
                                                             int32_t default_max_tokens, uint64_t id) {
  if (req.endpoint == Endpoint::kEmbeddings) {
    engine::Request er;
    er.id = id;
    er.embed_base64 = req.base64;
    const int32_t n_vocab = model.n_vocab();
    for (auto& tokens : req.input_tokens) {
      for (engine::Token t : tokens)
        if (t >= n_vocab)
          return RequestFailure{400, "invalid_request",
                                "token id " + std::to_string(t) + " is not in the model's vocabulary of " +
                                    std::to_string(n_vocab),
                                "input"};
      er.embed.push_back(std::move(tokens));
    }
    for (const std::string& text : req.inputs) er.embed.push_back(model.Tokenize(text));
    return er;
  }
  std::string prompt = std::move(req.prompt);
  std::optional<engine::ChatPrompt> tools;  // the template's grammar and parser for tool calls
  if (req.endpoint == Endpoint::kChatCompletions && engine::NeedsToolRendering(req.messages, req.chat_options)) {
    engine::ChatOptions& options = req.chat_options;
    const bool tools_on = !options.tools.empty() && options.tool_choice != engine::ToolChoice::kNone;
    // With tools on, the template's grammar covers response_format too.
    if (tools_on && req.response_format != ResponseFormat::kText)
      options.json_schema = req.response_format == ResponseFormat::kJsonSchema ? req.json_schema : R"({"type":"object"})";
    auto rendered = engine::RenderChat(model, req.messages, options);
    if (!rendered.ok()) {
      const bool unsupported = rendered.status().code() == StatusCode::kFailedPrecondition;
      return RequestFailure{400, unsupported ? "unsupported" : "invalid_request", rendered.status().message(),
                            options.tools.empty() ? "messages" : "tools"};
    }
    prompt = std::move(rendered->text);
    if (tools_on) {
      if (!rendered->grammar.empty())
        if (Status st = engine::CheckGrammar(model, rendered->grammar); !st.ok())
          return RequestFailure{400, "invalid_request", "the tools' grammar: " + st.message(), "tools"};
      tools = std::move(rendered).value();
      req.response_format = ResponseFormat::kText;
    }
  } else if (req.endpoint == Endpoint::kChatCompletions) {
    auto formatted = model.FormatChat(req.messages);
    if (!formatted.ok()) return RequestFailure{400, "unsupported", formatted.status().message(), "messages"};
    prompt = std::move(formatted).value();
  }
  engine::Request er;
  if (req.response_format != ResponseFormat::kText) {
    // Schema -> GBNF, then make sure llama.cpp parses it: a schema the
    // converter cannot handle is the request's 400, never an abort.
    auto grammar = req.response_format == ResponseFormat::kJsonSchema ? engine::JsonSchemaToGrammar(req.json_schema)
                                                                       : engine::JsonObjectGrammar();
    if (!grammar.ok()) {
      const bool unsupported = grammar.status().code() == StatusCode::kFailedPrecondition;
      return RequestFailure{400, unsupported ? "unsupported" : "invalid_request", grammar.status().message(),
                            "response_format"};
    }
    if (Status st = engine::CheckGrammar(model, *grammar); !st.ok())
      return RequestFailure{400, "invalid_request", st.message(), "response_format"};
    req.sampling.grammar = std::move(grammar).value();
  }
  er.id = id;
  // A system message's rendering is shared with the batch's other requests:
  // tokenized once (engine/prefix_tokens.h).
  const bool system_first = req.endpoint == Endpoint::kChatCompletions && !req.messages.empty() &&
                            (req.messages[0].role == "system" || req.messages[0].role == "developer");
  er.prompt = system_first ? model.Tokenize(prompt, req.messages[0].content) : model.Tokenize(prompt);
  er.sampling = std::move(req.sampling);
  if (tools) tools->ApplyTo(&er.sampling, &er.reply_parser);
  er.n = req.n;
  er.logprobs = req.logprobs;
  er.top_logprobs = req.top_logprobs;
  if (er.sampling.max_tokens <= 0 && default_max_tokens > 0) er.sampling.max_tokens = default_max_tokens;
  return er;
}

RequestFailure FailureFromStatus(const Status& s) {
  switch (s.code()) {
    case StatusCode::kResourceExhausted: return {400, "context_length_exceeded", s.message(), ""};
    case StatusCode::kInvalidArgument: return {400, "invalid_request", s.message(), ""};
    case StatusCode::kFailedPrecondition: return {400, "unsupported", s.message(), ""};
    default: return {500, "server_error", s.message(), ""};
  }
}

nlohmann::json ResponseBody(Endpoint endpoint, const engine::Result& r, std::string_view model_name, int64_t created) {
  if (endpoint == Endpoint::kEmbeddings) return EmbeddingsBody(r, r.embed_base64, model_name);
  return endpoint == Endpoint::kChatCompletions ? ChatCompletionBody(r, model_name, created, NewId("chatcmpl-"))
                                                : TextCompletionBody(r, model_name, created, NewId("cmpl-"));
}

}  // namespace kvb::batch
