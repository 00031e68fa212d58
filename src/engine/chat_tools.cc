#include "engine/chat_tools.h"

#include <algorithm>
#include <cctype>
#include <exception>
#include <map>
#include <mutex>

#include "llama.h"

#ifdef KVBATCH_HAVE_LLAMA_COMMON
#include "chat.h"
#include "common.h"
#endif

namespace kvb::engine {

void ChatPrompt::ApplyTo(SamplingParams* sampling, std::shared_ptr<const ReplyParser>* reply_parser) const {
  sampling->grammar = grammar;
  sampling->grammar_lazy = grammar_lazy;
  sampling->grammar_trigger_patterns = trigger_patterns;
  sampling->grammar_trigger_tokens = trigger_tokens;
  sampling->grammar_prefill = grammar_prefill;
  sampling->preserved_tokens = preserved_tokens;
  for (const std::string& s : stops)
    if (std::find(sampling->stop.begin(), sampling->stop.end(), s) == sampling->stop.end()) sampling->stop.push_back(s);
  *reply_parser = parser;
}

bool NeedsToolRendering(const std::vector<ChatMessage>& messages, const ChatOptions& options) {
  if (!options.tools.empty()) return true;
  return std::any_of(messages.begin(), messages.end(),
                     [](const ChatMessage& m) { return !m.tool_calls.empty() || m.role == "tool"; });
}

#ifndef KVBATCH_HAVE_LLAMA_COMMON

bool TemplateRendersTools(const Model&) { return false; }

StatusOr<ChatPrompt> RenderChat(const Model&, const std::vector<ChatMessage>&, const ChatOptions&) {
  return Status::FailedPrecondition("tool calling needs kvbatch built with llama.cpp's common library");
}

#else

namespace {

class CommonReplyParser : public ReplyParser {
 public:
  explicit CommonReplyParser(common_chat_parser_params params) : params_(std::move(params)) {}

  ParsedReply Parse(const std::string& text, bool partial) const override {
    ParsedReply out;
    common_chat_msg msg;
    try {
      msg = common_chat_parse(text, partial, params_);
    } catch (const std::exception&) {
      out.content = text;  // not in the template's format (cut by max_tokens, a stop string): plain text
      return out;
    }
    out.content = std::move(msg.content);
    out.reasoning = std::move(msg.reasoning_content);
    for (auto& c : msg.tool_calls) out.tool_calls.push_back({std::move(c.id), std::move(c.name), std::move(c.arguments)});
    return out;
  }

 private:
  common_chat_parser_params params_;
};

// Tokens of `text` without BOS, special tokens parsed.
std::vector<Token> RawTokens(const Model& model, const std::string& text) {
  std::vector<Token> out(text.size() + 8);
  int32_t n = llama_tokenize(model.vocab(), text.data(), static_cast<int32_t>(text.size()), out.data(),
                             static_cast<int32_t>(out.size()), false, true);
  if (n < 0) {
    out.resize(-n);
    n = llama_tokenize(model.vocab(), text.data(), static_cast<int32_t>(text.size()), out.data(),
                       static_cast<int32_t>(out.size()), false, true);
  }
  out.resize(std::max(0, n));
  return out;
}

common_chat_templates_inputs Inputs(const std::vector<ChatMessage>& messages, const std::vector<ChatTool>& tools,
                                    common_chat_tool_choice choice, const ChatOptions& options) {
  common_chat_templates_inputs in;
  for (const auto& m : messages) {
    common_chat_msg msg;
    msg.role = m.role;
    msg.content = m.content;
    msg.tool_call_id = m.tool_call_id;
    for (const auto& c : m.tool_calls) msg.tool_calls.push_back({c.name, c.arguments, c.id});
    in.messages.push_back(std::move(msg));
  }
  for (const auto& t : tools) in.tools.push_back({t.name, t.description, t.parameters});
  in.tool_choice = choice;
  in.parallel_tool_calls = options.parallel_tool_calls;
  in.json_schema = options.json_schema;
  in.add_generation_prompt = true;
  in.use_jinja = true;
  // Thinking stays in the content, as for every other request.
  in.reasoning_format = COMMON_REASONING_FORMAT_NONE;
  return in;
}

// Parsers are built from the serialized PEG arena the template's analysis
// gives; one job has one tool set for thousands of requests, so they are
// shared by what defines them.
std::shared_ptr<const ReplyParser> ParserFor(const common_chat_params& cp) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const ReplyParser>> cache;
  std::string key = std::to_string(static_cast<int>(cp.format)) + '\0' + cp.generation_prompt + '\0' + cp.parser;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  common_chat_parser_params params(cp);
  params.reasoning_format = COMMON_REASONING_FORMAT_NONE;
  params.parse_tool_calls = true;
  if (!cp.parser.empty()) params.parser.load(cp.parser);
  auto parser = std::make_shared<const CommonReplyParser>(std::move(params));
  if (cache.size() >= 64) cache.clear();
  cache.emplace(std::move(key), parser);
  return parser;
}

// The constraint half of the template's answer, in engine terms (as
// llama-server turns chat params into sampling params).
void Constrain(const Model& model, const common_chat_params& cp, ChatPrompt* out) {
  out->grammar = cp.grammar;
  out->grammar_lazy = cp.grammar_lazy;
  for (const std::string& s : cp.preserved_tokens) {
    auto ids = RawTokens(model, s);
    if (ids.size() == 1) out->preserved_tokens.push_back(ids[0]);
  }
  std::sort(out->preserved_tokens.begin(), out->preserved_tokens.end());
  auto preserved = [&](Token t) {
    return std::binary_search(out->preserved_tokens.begin(), out->preserved_tokens.end(), t);
  };
  for (const auto& trigger : cp.grammar_triggers) {
    switch (trigger.type) {
      case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
        auto ids = RawTokens(model, trigger.value);
        if (ids.size() == 1 && preserved(ids[0])) {
          out->trigger_tokens.push_back(ids[0]);
        } else {
          out->trigger_patterns.push_back(regex_escape(trigger.value));
        }
        break;
      }
      case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN: out->trigger_patterns.push_back(trigger.value); break;
      case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
        const std::string& p = trigger.value;
        out->trigger_patterns.push_back(p.empty() ? "^$"
                                                  : (p.front() != '^' ? "^" : "") + p + (p.back() != '$' ? "$" : ""));
        break;
      }
      case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN: out->trigger_tokens.push_back(trigger.token); break;
    }
  }
  // The start of the assistant's turn the grammar covers (llama.cpp's
  // sampler skips a leading-space token some tokenizers put before it).
  if (!cp.grammar_lazy && !cp.generation_prompt.empty()) {
    auto ids = RawTokens(model, cp.generation_prompt);
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string piece = model.Piece(ids[i], true);
      if (i == 0 && !piece.empty() && std::isspace(static_cast<unsigned char>(piece[0])) &&
          !std::isspace(static_cast<unsigned char>(cp.generation_prompt[0])))
        continue;
      out->grammar_prefill.push_back(ids[i]);
    }
  }
  out->stops = cp.additional_stops;
}

common_chat_tool_choice CommonChoice(ToolChoice c) {
  switch (c) {
    case ToolChoice::kNone: return COMMON_CHAT_TOOL_CHOICE_NONE;
    case ToolChoice::kRequired: return COMMON_CHAT_TOOL_CHOICE_REQUIRED;
    default: return COMMON_CHAT_TOOL_CHOICE_AUTO;
  }
}

}  // namespace

bool TemplateRendersTools(const Model& model) {
  const common_chat_templates* templates = model.chat_templates();
  if (templates == nullptr) return false;
  auto caps = common_chat_templates_get_caps(templates);
  auto it = caps.find("supports_tools");
  return it != caps.end() && it->second;
}

StatusOr<ChatPrompt> RenderChat(const Model& model, const std::vector<ChatMessage>& messages,
                                const ChatOptions& options) {
  const common_chat_templates* templates = model.chat_templates();
  if (templates == nullptr)
    return Status::FailedPrecondition(
        "this model has no chat template llama.cpp can render as Jinja, so it cannot be given tools");
  // A template that never reads `tools` would drop them silently: the
  // model would answer without knowing them. Refused rather than guessed.
  if (!options.tools.empty() && !TemplateRendersTools(model))
    return Status::FailedPrecondition(
        "the chat template of model " + model.name() +
        " does not show tools to the model (it never reads `tools`), so it cannot call them; use a model whose "
        "template supports tool calling");
  const bool forced = !options.forced_tool.empty();
  const common_chat_tool_choice choice = forced ? COMMON_CHAT_TOOL_CHOICE_REQUIRED : CommonChoice(options.tool_choice);
  ChatPrompt out;
  try {
    common_chat_params cp = common_chat_templates_apply(templates, Inputs(messages, options.tools, choice, options));
    out.text = std::move(cp.prompt);
    if (forced) {
      // The model sees every tool; the grammar and the parser know only the named one.
      std::vector<ChatTool> one;
      for (const auto& t : options.tools)
        if (t.name == options.forced_tool) one.push_back(t);
      cp = common_chat_templates_apply(templates, Inputs(messages, one, choice, options));
    }
    if (choice != COMMON_CHAT_TOOL_CHOICE_NONE && !options.tools.empty()) {
      Constrain(model, cp, &out);
      out.parser = ParserFor(cp);
    }
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("the model's chat template could not render this conversation: ") +
                                   e.what());
  }
  return out;
}

#endif

}  // namespace kvb::engine
