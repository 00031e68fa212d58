#include "batch/response.h"

#include <sys/random.h>

#include <array>
#include <cmath>
#include <random>

namespace kvb::batch {

namespace {

using nlohmann::json;

constexpr size_t kIdRandomBytes = 12;  // 24 hex characters

json Str(std::string_view s) { return json(ToValidUtf8(s)); }

json NullIfEmpty(std::string_view s) { return s.empty() ? json(nullptr) : Str(s); }

json Usage(const engine::Result& r) {
  return json{
      {"prompt_tokens", r.prompt_tokens},
      {"completion_tokens", r.completion_tokens},
      {"total_tokens", static_cast<int64_t>(r.prompt_tokens) + r.completion_tokens},
      {"prompt_tokens_details", json{{"cached_tokens", r.cached_tokens}}},
      {"completion_tokens_details", json{{"reasoning_tokens", 0}}},
  };
}

// The common envelope; `response` is already JSON text so a large body is
// dumped once, not copied into another document.
std::string Line(std::string_view custom_id, std::string_view response, std::string_view error) {
  std::string out;
  out.reserve(response.size() + error.size() + custom_id.size() + 96);
  out += "{\"id\":";
  out += DumpJson(json(NewId("batch_req_")));
  out += ",\"custom_id\":";
  out += DumpJson(Str(custom_id));
  out += ",\"response\":";
  out += response;
  out += ",\"error\":";
  out += error;
  out += '}';
  return out;
}

std::string Response(int status_code, const json& body) {
  std::string out = "{\"status_code\":" + std::to_string(status_code) + ",\"request_id\":";
  out += DumpJson(json(NewId("req_")));
  out += ",\"body\":";
  out += DumpJson(body);
  out += '}';
  return out;
}

}  // namespace

std::string ToValidUtf8(std::string_view s) {
  std::string out;
  size_t i = 0;
  const size_t n = s.size();
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  while (i < n) {
    unsigned char c = byte(i);
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // RFC 3629 ranges: no overlong forms, no surrogates, nothing past U+10FFFF.
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      need = 1;
    } else if (c == 0xE0) {
      need = 2, lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      need = 2;
    } else if (c == 0xED) {
      need = 2, hi = 0x9F;
    } else if (c == 0xF0) {
      need = 3, lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      need = 3;
    } else if (c == 0xF4) {
      need = 3, hi = 0x8F;
    }
    size_t j = 1;
    if (need > 0) {
      for (; j <= need && i + j < n; ++j) {
        unsigned char b = byte(i + j);
        bool ok = j == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
        if (!ok) break;
      }
    }
    if (need > 0 && j > need) {
      out.append(s.substr(i, need + 1));
      i += need + 1;
    } else {
      out += "\xEF\xBF\xBD";  // one U+FFFD per maximal invalid subpart
      i += j;
    }
  }
  return out;
}

std::string DumpJson(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string NewId(std::string_view prefix) {
  std::array<unsigned char, kIdRandomBytes> bytes{};
  size_t got = 0;
  while (got < bytes.size()) {
    ssize_t n = getrandom(bytes.data() + got, bytes.size() - got, 0);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  if (got < bytes.size()) {
    // getrandom(2) unavailable (old kernel, seccomp): random_device is still
    // the OS entropy source in libstdc++.
    thread_local std::random_device rd;
    for (auto& b : bytes) b = static_cast<unsigned char>(rd());
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(prefix);
  for (unsigned char b : bytes) {
    id += kHex[b >> 4];
    id += kHex[b & 0xf];
  }
  return id;
}

namespace {

// The fields chat.completion and text_completion objects share, around the choices.
json CompletionObject(std::string_view object, json choices, const engine::Result& r, std::string_view model,
                      int64_t created, std::string_view id, std::string_view system_fingerprint) {
  return json{{"id", Str(id)},
              {"object", object},
              {"created", created},
              {"model", Str(model)},
              {"choices", std::move(choices)},
              {"usage", Usage(r)},
              {"system_fingerprint", NullIfEmpty(system_fingerprint)}};
}

// The result's choices; a hand-made Result without `choices` is one choice.
std::vector<engine::Choice> Choices(const engine::Result& r) {
  if (!r.choices.empty()) return r.choices;
  engine::Choice c;
  c.text = r.text;
  c.tokens = r.tokens;
  c.finish = r.finish;
  return {c};
}

// OpenAI writes -9999.0 for a probability that is zero in float.
double Logprob(float lp) { return std::isfinite(lp) ? static_cast<double>(lp) : -9999.0; }

json Bytes(const std::string& piece) {
  json b = json::array();
  for (unsigned char c : piece) b.push_back(static_cast<int>(c));
  return b;
}

json ChatTokenProb(const engine::TokenProb& t) {
  return json{{"token", Str(t.piece)}, {"logprob", Logprob(t.logprob)}, {"bytes", Bytes(t.piece)}};
}

// {"content":[{"token","logprob","bytes","top_logprobs":[...]}],"refusal":null}
json ChatLogprobs(const engine::Choice& c) {
  json content = json::array();
  for (const engine::TokenLogprob& t : c.logprobs) {
    json item = ChatTokenProb(t);
    json top = json::array();
    for (const engine::TokenProb& alt : t.top) top.push_back(ChatTokenProb(alt));
    item["top_logprobs"] = std::move(top);
    content.push_back(std::move(item));
  }
  return json{{"content", std::move(content)}, {"refusal", nullptr}};
}

// {"tokens","token_logprobs","top_logprobs":[{token: logprob}],"text_offset"}
// (text_offset: byte offsets of each token in the generated text).
json CompletionLogprobs(const engine::Choice& c) {
  json tokens = json::array(), token_logprobs = json::array(), top = json::array(), offsets = json::array();
  size_t offset = 0;
  for (const engine::TokenLogprob& t : c.logprobs) {
    tokens.push_back(Str(t.piece));
    token_logprobs.push_back(Logprob(t.logprob));
    json alts = json::object();
    for (const engine::TokenProb& alt : t.top) alts.emplace(ToValidUtf8(alt.piece), Logprob(alt.logprob));
    top.push_back(std::move(alts));
    offsets.push_back(offset);
    offset += t.piece.size();
  }
  return json{{"tokens", std::move(tokens)},
              {"token_logprobs", std::move(token_logprobs)},
              {"top_logprobs", std::move(top)},
              {"text_offset", std::move(offsets)}};
}

}  // namespace

json ChatCompletionBody(const engine::Result& r, std::string_view model, int64_t created, std::string_view id,
                        std::string_view system_fingerprint) {
  json choices = json::array();
  const std::vector<engine::Choice> all = Choices(r);
  for (size_t i = 0; i < all.size(); ++i) {
    const engine::Choice& c = all[i];
    json message = {{"role", "assistant"}, {"content", Str(c.text)}, {"refusal", nullptr}};
    std::string finish = engine::FinishReasonName(c.finish);
    // A tools request: the template's format read back. An answer cut by
    // max_tokens stays text (its call would be incomplete).
    if (r.reply_parser && c.finish == engine::FinishReason::kStop) {
      engine::ParsedReply reply = r.reply_parser->Parse(c.text, false);
      message["content"] = reply.content.empty() && !reply.tool_calls.empty() ? json(nullptr) : Str(reply.content);
      if (!reply.reasoning.empty()) message["reasoning_content"] = Str(reply.reasoning);
      if (!reply.tool_calls.empty()) {
        json calls = json::array();
        for (engine::ToolCall& call : reply.tool_calls) {
          if (call.id.empty()) call.id = NewId("call_");
          // Compact, in the order written (the grammar allows free whitespace).
          auto args = nlohmann::ordered_json::parse(call.arguments, nullptr, false);
          if (!args.is_discarded()) call.arguments = args.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
          calls.push_back(ToolCallJson(call));
        }
        message["tool_calls"] = std::move(calls);
        finish = "tool_calls";
      }
    }
    choices.push_back(json{{"index", i},
                           {"message", std::move(message)},
                           {"logprobs", r.logprobs ? ChatLogprobs(c) : json(nullptr)},
                           {"finish_reason", finish}});
  }
  return CompletionObject("chat.completion", std::move(choices), r, model, created, id, system_fingerprint);
}

json ToolCallJson(const engine::ToolCall& call) {
  return json{{"id", Str(call.id)},
              {"type", "function"},
              {"function", json{{"name", Str(call.name)}, {"arguments", Str(call.arguments)}}}};
}

json TextCompletionBody(const engine::Result& r, std::string_view model, int64_t created, std::string_view id,
                        std::string_view system_fingerprint) {
  json choices = json::array();
  const std::vector<engine::Choice> all = Choices(r);
  for (size_t i = 0; i < all.size(); ++i) {
    const engine::Choice& c = all[i];
    choices.push_back(json{{"text", Str(c.text)},
                           {"index", i},
                           {"logprobs", r.logprobs ? CompletionLogprobs(c) : json(nullptr)},
                           {"finish_reason", engine::FinishReasonName(c.finish)}});
  }
  return CompletionObject("text_completion", std::move(choices), r, model, created, id, system_fingerprint);
}

json ErrorBody(std::string_view message, std::string_view type, std::string_view param, std::string_view code) {
  return json{{"error", json{{"message", Str(message)},
                             {"type", Str(type)},
                             {"param", NullIfEmpty(param)},
                             {"code", NullIfEmpty(code)}}}};
}

std::string SuccessLine(std::string_view custom_id, const json& body) {
  return Line(custom_id, Response(200, body), "null");
}

std::string FailureLine(std::string_view custom_id, int status_code, const json& error_body) {
  return Line(custom_id, Response(status_code, error_body), "null");
}

std::string RequestErrorLine(std::string_view custom_id, std::string_view code, std::string_view message) {
  return Line(custom_id, "null", DumpJson(json{{"code", Str(code)}, {"message", Str(message)}}));
}

}  // namespace kvb::batch
