#include "batch/tool_stream.h"

#include "batch/response.h"

namespace kvb::batch {

using nlohmann::json;

std::vector<json> ToolStream::Add(std::string_view text, bool final) {
  text_ += text;
  std::vector<json> out;
  engine::ParsedReply now = parser_->Parse(text_, !final);
  // Text already sent cannot be taken back: a read that no longer starts with
  // it (a marker that began as text) waits until it does again.
  if (now.content.size() > content_.size() && now.content.compare(0, content_.size(), content_) == 0) {
    out.push_back(json{{"content", ToValidUtf8(now.content.substr(content_.size()))}});
    content_ = std::move(now.content);
  }
  for (size_t i = 0; i < now.tool_calls.size(); ++i) {
    engine::ToolCall& call = now.tool_calls[i];
    if (call.name.empty()) break;  // its name is not complete yet
    json delta;
    if (i >= calls_.size()) {
      calls_.push_back({call.id.empty() ? NewId("call_") : call.id, call.name, call.arguments});
      delta = ToolCallJson(calls_[i]);  // the whole call so far, as a plain answer writes it
      delta["index"] = i;
    } else {
      std::string& sent = calls_[i].arguments;
      if (call.arguments.size() <= sent.size() || call.arguments.compare(0, sent.size(), sent) != 0) continue;
      delta = {{"index", i}, {"function", {{"arguments", ToValidUtf8(call.arguments.substr(sent.size()))}}}};
      sent = std::move(call.arguments);
    }
    out.push_back(json{{"tool_calls", json::array({std::move(delta)})}});
  }
  return out;
}

}  // namespace kvb::batch
