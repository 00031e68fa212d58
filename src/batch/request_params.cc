#include "batch/request_params.h"

#include <algorithm>
#include <limits>

#include "batch/limits.h"
#include "batch/response.h"

namespace kvb::batch::params {

const char* TypeName(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::object:
      return "an object";
    case json::value_t::array:
      return "an array";
    case json::value_t::string:
      return "a string";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float:
      return "a number";
    default:
      return "an unsupported value";
  }
}

std::string Show(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

void ParseStop(Params& p, std::vector<std::string>* out) {
  const json* v = p.Get("stop");
  if (v == nullptr) return;
  auto bad = [&] {
    p.Fail("stop", "Invalid 'stop': expected a string or an array of at most " +
                       std::to_string(GetLimits().max_stop_strings) + " strings.");
  };
  std::vector<std::string> stop;
  if (v->is_string()) {
    stop.push_back(v->get<std::string>());
  } else if (v->is_array() && v->size() <= static_cast<size_t>(GetLimits().max_stop_strings)) {
    for (const json& s : *v) {
      if (!s.is_string()) return bad();
      stop.push_back(s.get<std::string>());
    }
  } else {
    return bad();
  }
  for (const std::string& s : stop) {
    if (s.size() > static_cast<size_t>(GetLimits().max_stop_bytes))
      return p.Fail("stop", "Invalid 'stop': a stop string has " + std::to_string(s.size()) +
                                " bytes, over the limit of " + std::to_string(GetLimits().max_stop_bytes) + ".");
  }
  // An empty stop string would match everywhere; it carries no intent.
  std::erase_if(stop, [](const std::string& s) { return s.empty(); });
  *out = std::move(stop);
}

void ParseLogitBias(Params& p, std::vector<std::pair<engine::Token, float>>* out) {
  const json* v = p.Get("logit_bias");
  if (v == nullptr) return;
  if (!v->is_object()) return p.TypeError("logit_bias", "an object mapping token ids to numbers", *v);
  if (v->size() > static_cast<size_t>(GetLimits().max_logit_bias))
    return p.Fail("logit_bias", "Invalid 'logit_bias': " + std::to_string(v->size()) + " entries, over the limit of " +
                                    std::to_string(GetLimits().max_logit_bias) + ".");
  std::vector<std::pair<engine::Token, float>> bias;
  for (auto it = v->begin(); it != v->end(); ++it) {
    const std::string& key = it.key();
    int64_t id = 0;
    bool digits = !key.empty() && key.size() <= 10 &&
                  std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (digits) id = std::stoll(key);
    if (!digits || id > std::numeric_limits<engine::Token>::max()) {
      return p.Fail("logit_bias", "Invalid 'logit_bias': key \"" + ToValidUtf8(key.substr(0, 40)) +
                                      "\" is not a token id (a non-negative integer).");
    }
    const json& b = it.value();
    if (!b.is_number()) {
      return p.Fail("logit_bias", "Invalid 'logit_bias': the bias for token " + key + " must be a number, but got " +
                                      TypeName(b) + " instead.");
    }
    double d = b.get<double>();
    if (!(d >= -100.0 && d <= 100.0)) {
      return p.Fail("logit_bias", "Invalid 'logit_bias': the bias for token " + key +
                                      " must be between -100 and 100, but got " + Show(b) + " instead.");
    }
    bias.emplace_back(static_cast<engine::Token>(id), static_cast<float>(d));
  }
  std::sort(bias.begin(), bias.end());
  *out = std::move(bias);
}

std::optional<std::string> SchemaAt(Params& p, const json& schema, const std::string& param, std::string_view line,
                                    const std::string& pointer) {
  if (!schema.is_object()) {
    p.TypeError(param, "an object", schema);
    return std::nullopt;
  }
  if (Status st = CheckSchemaLimits(schema); !st.ok()) {
    p.Fail(param, "Invalid '" + param + "': " + st.message() + ".");
    return std::nullopt;
  }
  // nlohmann::json sorts object keys, and a grammar generates properties in
  // the schema's order: the line is read again with key order kept.
  auto doc = nlohmann::ordered_json::parse(line.begin(), line.end(), nullptr, false);
  return doc.at(nlohmann::ordered_json::json_pointer(pointer))
      .dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

void ParseResponseFormat(Params& p, std::string_view line, ParsedRequest* r) {
  const json* v = p.Get("response_format");
  if (v == nullptr) return;
  const char* kParam = "response_format";
  if (!v->is_object()) return p.TypeError(kParam, "an object", *v);
  auto type = v->find("type");
  if (type == v->end() || !type->is_string()) {
    return p.Fail(kParam, "Invalid 'response_format': expected a \"type\" of \"text\", \"json_object\" or \"json_schema\".");
  }
  const std::string& t = type->get_ref<const std::string&>();
  if (t == "text") return;
  if (t == "json_object") {
    auto schema = v->find("schema");
    if (schema == v->end() || schema->is_null()) {
      r->response_format = ResponseFormat::kJsonObject;
      return;
    }
    if (auto text = SchemaAt(p, *schema, "response_format.schema", line, "/body/response_format/schema")) {
      r->response_format = ResponseFormat::kJsonSchema;
      r->json_schema = std::move(*text);
    }
    return;
  }
  if (t != "json_schema") {
    return p.Fail(kParam, "Invalid 'response_format': expected a type of \"text\", \"json_object\" or \"json_schema\", but got \"" +
                              ToValidUtf8(t.substr(0, 40)) + "\" instead.");
  }
  auto js = v->find("json_schema");
  if (js == v->end() || !js->is_object()) {
    return p.Fail("response_format.json_schema",
                  "Invalid 'response_format.json_schema': type \"json_schema\" needs a \"json_schema\" object "
                  "({\"name\", \"schema\", \"strict\"}).");
  }
  if (auto name = js->find("name"); name != js->end() && !name->is_null() && !name->is_string())
    return p.TypeError("response_format.json_schema.name", "a string", *name);
  if (auto strict = js->find("strict"); strict != js->end() && !strict->is_null() && !strict->is_boolean())
    return p.TypeError("response_format.json_schema.strict", "a boolean", *strict);
  auto schema = js->find("schema");
  if (schema == js->end() || schema->is_null()) {
    r->response_format = ResponseFormat::kJsonObject;
    return;
  }
  if (auto text = SchemaAt(p, *schema, "response_format.json_schema.schema", line,
                           "/body/response_format/json_schema/schema")) {
    r->response_format = ResponseFormat::kJsonSchema;
    r->json_schema = std::move(*text);
  }
}

// Fields that would change the answer and that kvbatch cannot honour yet:
// a 400 naming the field, never silently ignored.
void RejectUnsupported(Params& p, Endpoint endpoint) {
  for (const char* name : {"audio", "prediction", "web_search_options"}) {
    if (p.Get(name) != nullptr)
      return p.Fail(name, std::string("'") + name + "' is not supported by kvbatch yet (audio, "
                                                    "predicted outputs and web search are not available).");
  }
  if (endpoint == Endpoint::kCompletions)
    for (const char* name : {"tools", "tool_choice", "functions", "function_call"})
      if (p.Get(name) != nullptr)
        return p.Fail(name, std::string("'") + name + "' is a chat parameter: /v1/completions has no tools.");
  if (const json* m = p.Get("modalities")) {
    const bool text_only = m->is_array() && std::all_of(m->begin(), m->end(), [](const json& x) { return x == "text"; });
    if (!text_only) return p.Fail("modalities", "'modalities' other than [\"text\"] are not supported by kvbatch.");
  }
  if (endpoint != Endpoint::kCompletions) return;
  if (const json* echo = p.Get("echo"); echo != nullptr && !(echo->is_boolean() && !echo->get<bool>()))
    return p.Fail("echo", "'echo' is not supported by kvbatch.");
  if (const json* suffix = p.Get("suffix"); suffix != nullptr && !(suffix->is_string() && suffix->get_ref<const std::string&>().empty()))
    return p.Fail("suffix", "'suffix' is not supported by kvbatch.");
  if (const json* best_of = p.Get("best_of"); best_of != nullptr && Params::IntegerValue(*best_of) != int64_t{1})
    p.Fail("best_of", "'best_of' other than 1 is not supported by kvbatch; use 'n'.");
}

// metadata: at most Limits::max_metadata_keys string values (OpenAI's shape).
void CheckMetadata(Params& p) {
  const json* m = p.Get("metadata");
  if (m == nullptr) return;
  std::string param;
  if (Status st = CheckMetadataValue(*m, &param); !st.ok()) p.Fail(param, st.message());
}

void ParseLogprobs(Params& p, Endpoint endpoint, ParsedRequest* r) {
  if (endpoint == Endpoint::kCompletions) {
    // The legacy API's logprobs is the number of alternatives per token.
    if (auto k = p.Integer("logprobs", 0, kMaxTopLogprobs)) {
      r->logprobs = true;
      r->top_logprobs = static_cast<int32_t>(*k);
    }
    return;
  }
  if (const json* v = p.Get("logprobs")) {
    if (!v->is_boolean()) return p.TypeError("logprobs", "a boolean", *v);
    r->logprobs = v->get<bool>();
  }
  if (auto k = p.Integer("top_logprobs", 0, kMaxTopLogprobs)) {
    if (*k > 0 && !r->logprobs)
      return p.Fail("top_logprobs", "Invalid 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'.");
    r->top_logprobs = static_cast<int32_t>(*k);
  }
}

}  // namespace kvb::batch::params
