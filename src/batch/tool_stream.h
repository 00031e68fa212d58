// Streaming a tools request: the text generated so far is read with the
// template's parser (partial mode) after every piece, and what changed since
// the last read goes out as OpenAI chat.completion.chunk deltas: content
// text, and tool calls as they take shape (the first delta of a call has its
// index, id, type and name; later ones append to its arguments), as
// llama-server does.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "engine/chat_tools.h"

namespace kvb::batch {

class ToolStream {
 public:
  explicit ToolStream(std::shared_ptr<const engine::ReplyParser> parser) : parser_(std::move(parser)) {}

  // The deltas ({"content":...} or {"tool_calls":[...]}) that `text`, appended
  // to the answer, makes known. `final`: the answer is complete (read in
  // full, not partially).
  std::vector<nlohmann::json> Add(std::string_view text, bool final = false);

 private:
  std::shared_ptr<const engine::ReplyParser> parser_;
  std::string text_;
  std::string content_;                     // content sent so far
  std::vector<engine::ToolCall> calls_;     // calls as sent so far (ids ours unless the model's)
};

}  // namespace kvb::batch
