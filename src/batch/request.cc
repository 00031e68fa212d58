#include "batch/request.h"

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "batch/embeddings.h"
#include "batch/limits.h"
#include "batch/request_params.h"
#include "batch/response.h"
#include "batch/tools.h"

namespace kvb::batch {

namespace {

using nlohmann::json;
using namespace params;  // TypeName, Show, Params and the parameter parsers (request_params.h)

constexpr std::string_view kChatPath = "/v1/chat/completions";
constexpr std::string_view kCompletionsPath = "/v1/completions";
constexpr std::string_view kEmbeddingsPath = "/v1/embeddings";
constexpr size_t kCompletionPrefixBytes = 256;  // how much of a prompt groups completions
constexpr size_t kMaxErrorDetailBytes = 200;    // parser messages can quote long input


// The line as far as structural validation goes. Messages/prompt are
// materialised because both ValidateLine (prefix hash) and ParseRequest need them.
struct Structure {
  json doc;
  std::string custom_id;
  Endpoint endpoint = Endpoint::kChatCompletions;
  std::vector<engine::ChatMessage> messages;
  std::string prompt;
  std::vector<std::string> inputs;                  // embeddings
  std::vector<std::vector<engine::Token>> input_tokens;
};

LineError Error(int64_t line, const char* code, std::string message, std::string param, std::string custom_id = {}) {
  return LineError{line, code, std::move(message), std::move(param), std::move(custom_id)};
}

// Text of one message's content; nullopt with *why set when malformed.
std::optional<std::string> ContentText(const json& msg, const std::string& role, std::string* why) {
  auto it = msg.find("content");
  if (it == msg.end() || it->is_null()) {
    // OpenAI allows an assistant turn without content (it carried tool calls).
    if (role == "assistant") return std::string();
    *why = "must have a string or an array of text parts as content";
    return std::nullopt;
  }
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array()) {
    *why = std::string("content must be a string or an array of text parts, but got ") + TypeName(*it);
    return std::nullopt;
  }
  std::string text;
  size_t k = 0;
  for (const json& part : *it) {
    auto type = part.is_object() ? part.find("type") : part.end();
    auto txt = part.is_object() ? part.find("text") : part.end();
    if (!part.is_object() || type == part.end() || !type->is_string() || *type != "text" || txt == part.end() ||
        !txt->is_string()) {
      *why = "content[" + std::to_string(k) +
             "] must be {\"type\":\"text\",\"text\":<string>} "
             "(only text content is supported)";
      return std::nullopt;
    }
    if (k > 0) text += '\n';  // vLLM joins text parts with a newline
    text += txt->get_ref<const std::string&>();
    ++k;
  }
  return text;
}

// The roles a chat template renders; the legacy "function" role is
// refused (FailedPrecondition). *field is the offending member.
Status CheckRole(const std::string& role, std::string* field) {
  *field = ".role";
  if (role == "function")
    return Status::FailedPrecondition("\"function\" is the deprecated form of tool results and is not supported: "
                                      "use \"tool\" messages");
  if (role != "system" && role != "developer" && role != "user" && role != "assistant" && role != "tool")
    return Status::InvalidArgument("\"" + ToValidUtf8(role.substr(0, 40)) +
                                   "\" is not a valid role (system, developer, user, assistant or tool)");
  return Status::Ok();
}

std::variant<Structure, LineError> ParseStructure(std::string_view text, int64_t line) {
  Structure s;
  const Limits& limits = GetLimits();
  if (Status depth = CheckJsonDepth(text, limits.max_json_depth); !depth.ok()) {
    // Read only the top level (nlohmann's parser is iterative; deeper
    // values are discarded as they end), so the error names the request.
    json top = json::parse(
        text.begin(), text.end(), [](int d, json::parse_event_t, json&) { return d <= 1; }, false);
    std::string id;
    if (top.is_object())
      if (auto it = top.find("custom_id"); it != top.end() && it->is_string()) id = it->get<std::string>();
    return Error(line, kJsonTooDeep, "line " + depth.message(), "", std::move(id));
  }
  // nlohmann's lexer takes a NUL byte for the end of the input, and raw
  // control characters are invalid JSON anyway: refuse it rather than read
  // half a line.
  if (text.find('\0') != std::string_view::npos)
    return Error(line, kInvalidJson, "line is not valid JSON: it contains a NUL byte", "");
  try {
    s.doc = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    std::string detail = e.what();
    // "[json.exception.parse_error.101] parse error at ..." -> "parse error at ..."
    if (auto pos = detail.find("] "); detail.rfind("[json.exception.", 0) == 0 && pos != std::string::npos) {
      detail.erase(0, pos + 2);
    }
    if (detail.size() > kMaxErrorDetailBytes) detail = detail.substr(0, kMaxErrorDetailBytes) + "...";
    return Error(line, kInvalidJson, "line is not valid JSON: " + ToValidUtf8(detail), "");
  }
  if (!s.doc.is_object()) {
    return Error(line, kInvalidJson, std::string("line must be a JSON object, but got ") + TypeName(s.doc), "");
  }
  const json& doc = s.doc;

  auto id = doc.find("custom_id");
  if (id == doc.end() || !id->is_string() || id->get_ref<const std::string&>().empty()) {
    std::string what = id == doc.end()   ? "is missing"
                       : id->is_string() ? "is empty"
                                         : std::string("must be a string, but got ") + TypeName(*id);
    return Error(line, kMissingCustomId, "custom_id " + what, "custom_id");
  }
  s.custom_id = id->get<std::string>();

  auto method = doc.find("method");
  if (method == doc.end() || !method->is_string() || *method != "POST") {
    return Error(line, kInvalidMethod, "method must be \"POST\"", "method", s.custom_id);
  }

  auto url = doc.find("url");
  std::optional<Endpoint> endpoint;
  if (url != doc.end() && url->is_string()) endpoint = EndpointFromPath(url->get_ref<const std::string&>());
  if (!endpoint) {
    return Error(line, kInvalidUrl, "url must be \"/v1/chat/completions\", \"/v1/completions\" or \"/v1/embeddings\"",
                 "url", s.custom_id);
  }
  s.endpoint = *endpoint;

  auto body = doc.find("body");
  if (body == doc.end() || !body->is_object()) {
    std::string what = body == doc.end() ? "is missing" : std::string("must be an object, but got ") + TypeName(*body);
    return Error(line, kInvalidBody, "body " + what, "body", s.custom_id);
  }

  if (s.endpoint == Endpoint::kEmbeddings) {
    std::string param;
    if (Status st = ParseEmbeddingInput(*body, &s.inputs, &s.input_tokens, &param); !st.ok())
      return Error(line, kInvalidInput, st.message(), param, s.custom_id);
  } else if (s.endpoint == Endpoint::kChatCompletions) {
    auto msgs = body->find("messages");
    if (msgs == body->end() || !msgs->is_array() || msgs->empty()) {
      std::string what = msgs == body->end() ? "is missing"
                         : !msgs->is_array() ? std::string("must be an array, but got ") + TypeName(*msgs)
                                             : "must not be empty";
      return Error(line, kInvalidMessages, "body.messages " + what, "body.messages", s.custom_id);
    }
    if (msgs->size() > static_cast<size_t>(limits.max_messages)) {
      return Error(line, kInvalidMessages,
                   "body.messages has " + std::to_string(msgs->size()) + " messages, over the limit of " +
                       std::to_string(limits.max_messages),
                   "body.messages", s.custom_id);
    }
    s.messages.reserve(msgs->size());
    int64_t prompt_bytes = 0;
    for (size_t i = 0; i < msgs->size(); ++i) {
      const json& m = (*msgs)[i];
      const std::string where = "body.messages[" + std::to_string(i) + "]";
      if (!m.is_object()) {
        return Error(line, kInvalidMessages, where + " must be an object, but got " + TypeName(m), where, s.custom_id);
      }
      auto role = m.find("role");
      if (role == m.end() || !role->is_string() || role->get_ref<const std::string&>().empty()) {
        return Error(line, kInvalidMessages, where + " must have a non-empty string role", where + ".role",
                     s.custom_id);
      }
      engine::ChatMessage cm;
      cm.role = role->get<std::string>();
      std::string field;
      Status st = CheckRole(cm.role, &field);
      if (st.ok()) st = ParseMessageTools(m, cm.role, &cm, &field);
      if (!st.ok()) {
        const bool unsupported = st.code() == StatusCode::kFailedPrecondition;
        return Error(line, unsupported ? kUnsupported : kInvalidMessages, where + field + " " + st.message(),
                     where + field, s.custom_id);
      }
      std::string why;
      auto content = ContentText(m, cm.role, &why);
      if (!content) return Error(line, kInvalidMessages, where + " " + why, where + ".content", s.custom_id);
      cm.content = std::move(*content);
      prompt_bytes += static_cast<int64_t>(cm.content.size());
      for (const auto& call : cm.tool_calls) prompt_bytes += static_cast<int64_t>(call.arguments.size());
      if (prompt_bytes > limits.max_prompt_bytes) {
        return Error(line, kInvalidMessages,
                     "body.messages hold more than " + std::to_string(limits.max_prompt_bytes) +
                         " bytes of text (the prompt size limit)",
                     "body.messages", s.custom_id);
      }
      s.messages.push_back(std::move(cm));
    }
  } else {
    auto prompt = body->find("prompt");
    const json* p = nullptr;
    if (prompt != body->end()) {
      if (prompt->is_string()) {
        p = &*prompt;
      } else if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) {
        p = &(*prompt)[0];  // a batch of one prompt is one prompt
      }
    }
    if (p == nullptr) {
      std::string what = prompt == body->end() ? "is missing" : "must be a string (or an array of exactly one string)";
      return Error(line, kInvalidPrompt, "body.prompt " + what, "body.prompt", s.custom_id);
    }
    s.prompt = p->get<std::string>();
    if (static_cast<int64_t>(s.prompt.size()) > limits.max_prompt_bytes) {
      return Error(line, kInvalidPrompt,
                   "body.prompt has " + std::to_string(s.prompt.size()) + " bytes, over the prompt size limit of " +
                       std::to_string(limits.max_prompt_bytes),
                   "body.prompt", s.custom_id);
    }
  }
  return s;
}

uint64_t HashFramed(uint64_t h, std::string_view piece) {
  // Length framing keeps ("ab","c") and ("a","bc") apart.
  uint64_t n = piece.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  h = Fnv1a64(std::string_view(len, 8), h);
  return Fnv1a64(piece, h);
}

uint64_t PrefixHash(const Structure& s) {
  uint64_t h = HashFramed(Fnv1a64(""), EndpointPath(s.endpoint));
  // Lines for different models never share a prefix; grouping by model
  // also runs a mixed batch model by model (kvbatch serve -m A -m B).
  if (auto m = s.doc["body"].find("model"); m != s.doc["body"].end() && m->is_string())
    h = HashFramed(h, m->get_ref<const std::string&>());
  if (s.endpoint == Endpoint::kChatCompletions) {
    // The tools are rendered into the prompt (usually the system turn).
    if (auto tools = s.doc["body"].find("tools"); tools != s.doc["body"].end() && !tools->is_null())
      h = HashFramed(h, DumpJson(*tools));
    for (size_t i = 0; i + 1 < s.messages.size(); ++i) {
      h = HashFramed(h, s.messages[i].role);
      h = HashFramed(h, s.messages[i].content);
      for (const auto& call : s.messages[i].tool_calls) h = HashFramed(h, call.name + '\0' + call.arguments);
    }
  } else {
    h = HashFramed(h, std::string_view(s.prompt).substr(0, kCompletionPrefixBytes));
  }
  return h;
}

}  // namespace

Status CheckMetadataValue(const nlohmann::json& m, std::string* param) {
  const Limits& limits = GetLimits();
  if (param != nullptr) *param = "metadata";
  if (!m.is_object()) return Status::InvalidArgument("Invalid 'metadata': expected an object of strings.");
  if (m.size() > static_cast<size_t>(limits.max_metadata_keys))
    return Status::InvalidArgument("Invalid 'metadata': " + std::to_string(m.size()) + " keys, over the limit of " +
                                   std::to_string(limits.max_metadata_keys) + ".");
  for (const auto& [key, value] : m.items()) {
    const std::string shown = ToValidUtf8(key.substr(0, 80));
    if (param != nullptr) *param = "metadata." + shown;
    if (key.size() > static_cast<size_t>(limits.max_metadata_key_chars))
      return Status::InvalidArgument("Invalid 'metadata': a key is longer than " +
                                     std::to_string(limits.max_metadata_key_chars) + " characters.");
    if (!value.is_string())
      return Status::InvalidArgument("Invalid 'metadata': the value of '" + shown + "' must be a string, but got " +
                                     TypeName(value) + ".");
    if (value.get_ref<const std::string&>().size() > static_cast<size_t>(limits.max_metadata_value_chars))
      return Status::InvalidArgument("Invalid 'metadata': the value of '" + shown + "' is longer than " +
                                     std::to_string(limits.max_metadata_value_chars) + " characters.");
  }
  if (param != nullptr) *param = "metadata";
  return Status::Ok();
}

std::string_view EndpointPath(Endpoint endpoint) {
  switch (endpoint) {
    case Endpoint::kChatCompletions: return kChatPath;
    case Endpoint::kCompletions: return kCompletionsPath;
    default: return kEmbeddingsPath;
  }
}

std::optional<Endpoint> EndpointFromPath(std::string_view path) {
  if (path == kChatPath) return Endpoint::kChatCompletions;
  if (path == kCompletionsPath) return Endpoint::kCompletions;
  if (path == kEmbeddingsPath) return Endpoint::kEmbeddings;
  return std::nullopt;
}

uint64_t Fnv1a64(std::string_view data, uint64_t state) {
  for (unsigned char c : data) {
    state ^= c;
    state *= 0x100000001b3ull;
  }
  return state;
}

std::variant<LineInfo, LineError> ValidateLine(std::string_view text, int64_t line_no) {
  auto parsed = ParseStructure(text, line_no);
  if (auto* err = std::get_if<LineError>(&parsed)) return std::move(*err);
  Structure& s = std::get<Structure>(parsed);
  return LineInfo{std::move(s.custom_id), s.endpoint, PrefixHash(s)};
}

StatusOr<ParsedRequest> ParseRequest(std::string_view text, std::string* error_param) {
  auto parsed = ParseStructure(text, 0);
  if (auto* err = std::get_if<LineError>(&parsed)) {
    if (error_param != nullptr) *error_param = err->param;
    return Status::InvalidArgument(err->message);
  }
  Structure& s = std::get<Structure>(parsed);
  const json& body = s.doc["body"];

  ParsedRequest r;
  r.custom_id = std::move(s.custom_id);
  r.endpoint = s.endpoint;
  r.messages = std::move(s.messages);
  r.prompt = std::move(s.prompt);
  r.inputs = std::move(s.inputs);
  r.input_tokens = std::move(s.input_tokens);

  Params p(body);
  if (const json* model = p.Get("model")) {
    if (model->is_string()) {
      r.model = model->get<std::string>();
    } else {
      p.TypeError("model", "a string", *model);
    }
  }
  if (r.endpoint == Endpoint::kEmbeddings) {
    if (const json* f = p.Get("encoding_format"); f != nullptr && p.ok()) {
      if (*f == "base64") r.base64 = true;
      else if (*f != "float") p.Fail("encoding_format", "Invalid 'encoding_format': expected 'float' or 'base64'.");
    }
    if (p.Get("dimensions") != nullptr && p.ok())
      p.Fail("dimensions", "'dimensions' is not supported by kvbatch: embeddings have the model's width.");
    if (!p.ok()) {
      if (error_param != nullptr) *error_param = p.param();
      return Status::InvalidArgument(p.message());
    }
    return r;
  }
  RejectUnsupported(p, r.endpoint);
  CheckMetadata(p);
  engine::SamplingParams& sp = r.sampling;
  p.Number("temperature", 0.0, 2.0, false, &sp.temperature);
  p.Number("top_p", 0.0, 1.0, true, &sp.top_p);
  // vLLM spells "no top-k" as -1; the engine spells it 0.
  if (auto k = p.Integer("top_k", -1, std::numeric_limits<int32_t>::max()))
    sp.top_k = *k < 0 ? 0 : static_cast<int32_t>(*k);
  p.Number("min_p", 0.0, 1.0, false, &sp.min_p);
  p.Number("presence_penalty", -2.0, 2.0, false, &sp.presence_penalty);
  p.Number("frequency_penalty", -2.0, 2.0, false, &sp.frequency_penalty);
  if (auto n = p.Integer("n", 1, kMaxChoices)) r.n = static_cast<int32_t>(*n);
  constexpr int64_t kMaxTokensLimit = std::numeric_limits<int32_t>::max();
  auto max_tokens = p.Integer("max_tokens", 1, kMaxTokensLimit);
  auto max_completion_tokens = p.Integer("max_completion_tokens", 1, kMaxTokensLimit);
  if (max_completion_tokens) {
    sp.max_tokens = static_cast<int32_t>(*max_completion_tokens);
  } else if (max_tokens) {
    sp.max_tokens = static_cast<int32_t>(*max_tokens);
  }
  if (p.ok()) ParseStop(p, &sp.stop);
  if (p.ok()) ParseLogitBias(p, &sp.logit_bias);
  if (p.ok()) ParseLogprobs(p, r.endpoint, &r);
  if (p.ok()) ParseResponseFormat(p, text, &r);
  if (p.ok() && r.endpoint == Endpoint::kChatCompletions) ParseTools(p, text, &r);
  if (const json* seed = p.Get("seed"); seed != nullptr && p.ok()) {
    if (seed->is_number_unsigned()) {
      sp.seed = seed->get<uint64_t>();
    } else if (seed->is_number_integer()) {
      sp.seed = static_cast<uint64_t>(seed->get<int64_t>());
    } else if (auto v = Params::IntegerValue(*seed);
               v && seed->get<double>() > -9.2e18 && seed->get<double>() < 9.2e18) {
      sp.seed = static_cast<uint64_t>(*v);
    } else {
      p.TypeError("seed", "a 64-bit integer", *seed);
    }
    r.has_seed = p.ok();
  }
  if (!p.ok()) {
    if (error_param != nullptr) *error_param = p.param();
    return Status::InvalidArgument(p.message());
  }
  if (!r.has_seed) sp.seed = SeedFromCustomId(r.custom_id);
  return r;
}

}  // namespace kvb::batch
