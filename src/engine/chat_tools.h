// Tool calling: a chat with tools rendered by the model's own template, the
// grammar that keeps its tool calls well formed, and the parser that turns
// the answer's text back into content and tool calls. All of it is
// llama.cpp's common chat machinery, as llama-server uses it with --jinja:
// the template decides how tools are shown and how the model calls them
// (Hermes' <tool_call>, Llama 3's JSON, Mistral's [TOOL_CALLS], ...).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/types.h"
#include "util/status.h"

namespace kvb::engine {

struct ChatTool {
  std::string name;
  std::string description;
  std::string parameters = "{}";  // JSON schema text (object properties in the order written)
};

enum class ToolChoice { kAuto, kNone, kRequired };

struct ChatOptions {
  std::vector<ChatTool> tools;
  ToolChoice tool_choice = ToolChoice::kAuto;
  // tool_choice naming one function: every tool is shown to the model, and
  // the answer must be a call of this one (tool_choice is kRequired).
  std::string forced_tool;
  bool parallel_tool_calls = true;
  // response_format's schema, honoured beside the tools (the template's
  // grammar then allows either tool calls or JSON of this schema).
  std::string json_schema;
};

// An answer read back: its text, its reasoning where the template marks it,
// and its tool calls (ids empty unless the model wrote them).
struct ParsedReply {
  std::string content;
  std::string reasoning;
  std::vector<ToolCall> tool_calls;
};

class ReplyParser {
 public:
  virtual ~ReplyParser() = default;
  // `partial`: the text so far of an answer still being generated
  // (streaming). Never throws: text it cannot read is content.
  virtual ParsedReply Parse(const std::string& text, bool partial) const = 0;
};

// A rendered chat with what the engine needs to constrain and read the
// answer. Everything here is filled in SamplingParams / Request by ApplyTo.
struct ChatPrompt {
  std::string text;
  std::string grammar;  // GBNF; empty: no constraint (tool_choice "none")
  bool grammar_lazy = false;
  std::vector<std::string> trigger_patterns;
  std::vector<Token> trigger_tokens;
  std::vector<Token> grammar_prefill;
  std::vector<Token> preserved_tokens;  // sorted
  std::vector<std::string> stops;       // the template's own stop strings
  std::shared_ptr<const ReplyParser> parser;  // null with tool_choice "none"

  // Copies the grammar, triggers, prefill, preserved tokens and stops into
  // `sampling` (after the request's own stops) and the parser into `reply_parser`.
  void ApplyTo(SamplingParams* sampling, std::shared_ptr<const ReplyParser>* reply_parser) const;
};

// True when the messages or options need the tool machinery (tools given,
// or tool calls / tool results in the history).
bool NeedsToolRendering(const std::vector<ChatMessage>& messages, const ChatOptions& options);

// Whether the model's template shows tools to the model (llama.cpp's
// template capabilities: it reads the `tools` variable).
bool TemplateRendersTools(const Model& model);

// Renders messages and tools through the model's Jinja template.
// FailedPrecondition when the model has no template llama.cpp's common
// library can render (or kvbatch was built without it), or tools are given
// and the template does not render tools; InvalidArgument
// when the template or the common library refuses these messages.
// Thread-safe.
StatusOr<ChatPrompt> RenderChat(const Model& model, const std::vector<ChatMessage>& messages,
                                const ChatOptions& options);

}  // namespace kvb::engine
