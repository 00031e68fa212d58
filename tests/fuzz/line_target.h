// fuzz_line: one batch input line through structural validation and the
// full parse, then into the error/output lines kvbatch would write for it.
//
// Invariants: nothing crashes or throws; ValidateLine and ParseRequest agree
// on structure (a line ValidateLine rejects never parses, and a parsed line
// has the custom_id and endpoint ValidateLine saw); every message is valid
// UTF-8 and the line written for a failure is one line of valid JSON.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>

#include "batch/request.h"
#include "batch/response.h"
#include "fuzz_check.h"

namespace kvb::fuzz {

inline void CheckOutputLine(const std::string& line) {
  KVB_FUZZ_CHECK(line.find('\n') == std::string::npos, "an output line holds a raw newline: " + Show(line));
  KVB_FUZZ_CHECK(nlohmann::json::accept(line), "an output line is not valid JSON: " + Show(line));
}

inline void FuzzLine(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto checked = batch::ValidateLine(text, 1);
  std::string param;
  const auto parsed = batch::ParseRequest(text, &param);

  if (const auto* err = std::get_if<batch::LineError>(&checked)) {
    KVB_FUZZ_CHECK(err->line == 1, "LineError.line is not the line number given");
    KVB_FUZZ_CHECK(!err->code.empty(), "LineError without a code");
    KVB_FUZZ_CHECK(IsValidUtf8(err->message), "LineError.message is not UTF-8: " + Show(err->message));
    KVB_FUZZ_CHECK(IsValidUtf8(err->param), "LineError.param is not UTF-8: " + Show(err->param));
    KVB_FUZZ_CHECK(IsValidUtf8(err->custom_id), "LineError.custom_id is not UTF-8: " + Show(err->custom_id));
    KVB_FUZZ_CHECK(!parsed.ok(), "ValidateLine rejects the line (" + err->code + ") but ParseRequest accepts it");
    CheckOutputLine(batch::RequestErrorLine(err->custom_id, err->code, err->message));
  } else {
    const auto& info = std::get<batch::LineInfo>(checked);
    KVB_FUZZ_CHECK(!info.custom_id.empty(), "a valid line with an empty custom_id");
    if (parsed.ok()) {
      KVB_FUZZ_CHECK(parsed->custom_id == info.custom_id, "ParseRequest and ValidateLine disagree on custom_id");
      KVB_FUZZ_CHECK(parsed->endpoint == info.endpoint, "ParseRequest and ValidateLine disagree on the endpoint");
    } else {
      CheckOutputLine(batch::FailureLine(
          info.custom_id, 400, batch::ErrorBody(parsed.status().message(), "invalid_request_error", param, "")));
    }
  }

  if (!parsed.ok()) {
    KVB_FUZZ_CHECK(parsed.status().code() == StatusCode::kInvalidArgument,
                   "ParseRequest failed with " + parsed.status().ToString());
    KVB_FUZZ_CHECK(IsValidUtf8(parsed.status().message()), "ParseRequest's message is not UTF-8");
    KVB_FUZZ_CHECK(IsValidUtf8(param), "ParseRequest's error param is not UTF-8");
    return;
  }
  const batch::ParsedRequest& r = *parsed;
  KVB_FUZZ_CHECK(r.n >= 1 && r.n <= batch::kMaxChoices, "n out of range: " + std::to_string(r.n));
  KVB_FUZZ_CHECK(r.top_logprobs >= 0 && r.top_logprobs <= batch::kMaxTopLogprobs, "top_logprobs out of range");
  KVB_FUZZ_CHECK(r.sampling.stop.size() <= 4, "more than 4 stop strings");
  for (const auto& stop : r.sampling.stop) KVB_FUZZ_CHECK(!stop.empty(), "an empty stop string was kept");
  KVB_FUZZ_CHECK(r.sampling.max_tokens == -1 || r.sampling.max_tokens >= 1, "max_tokens out of range");
  if (r.response_format == batch::ResponseFormat::kJsonSchema)
    KVB_FUZZ_CHECK(nlohmann::json::accept(r.json_schema), "json_schema is not JSON: " + Show(r.json_schema));
  for (const auto& m : r.messages) {
    KVB_FUZZ_CHECK(IsValidUtf8(m.role), "a message role is not UTF-8");
    KVB_FUZZ_CHECK(IsValidUtf8(m.content), "a message content is not UTF-8");
  }
  if (r.endpoint == batch::Endpoint::kChatCompletions)
    KVB_FUZZ_CHECK(!r.messages.empty(), "a chat request without messages");
}

}  // namespace kvb::fuzz
