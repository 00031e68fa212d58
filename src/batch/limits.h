// Limits on what one request may ask for (DESIGN.md section 5). Every size
// a request can make kvbatch allocate or compute is bounded here, checked
// while parsing, and answered with a 400 (HTTP) or an invalid line (batch)
// that names the limit. Defaults fit real jobs; flags change the first few
// (README "Limits").
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string_view>

#include "util/json_depth.h"
#include "util/status.h"

namespace kvb::batch {

struct Limits {
  // Nesting of any JSON document: a batch line, an HTTP body, a schema.
  // Checked by a scan before parsing, so no input can overflow a stack.
  int32_t max_json_depth = 64;        // --max-json-depth
  int64_t max_body_bytes = 16 << 20;  // JSON HTTP bodies (serve --max-body-bytes)
  int64_t max_prompt_bytes = 8 << 20; // all message contents (or the prompt) of one request
  int32_t max_messages = 2048;
  int32_t max_stop_strings = 4;       // OpenAI's limit
  int32_t max_stop_bytes = 1024;      // one stop string
  int32_t max_logit_bias = 1024;      // entries
  // response_format schemas: size as JSON text, enum/const values, and the
  // repetition counts (minItems, maxItems, minLength, maxLength,
  // min/maxProperties, {n,m} in patterns) a grammar is unrolled to.
  int64_t max_schema_bytes = 256 << 10;
  int32_t max_schema_enum = 4096;
  int64_t max_schema_repetition = 1000;
  // metadata (batches and chat bodies): OpenAI's limits.
  int32_t max_metadata_keys = 16;
  int32_t max_metadata_key_chars = 64;
  int32_t max_metadata_value_chars = 512;
};

// The process's limits: set once at startup (before any request is parsed).
const Limits& GetLimits();
void SetLimits(const Limits& limits);

// Scans JSON text for its nesting depth without recursion and without
// parsing it (util/json_depth.h).
using kvb::CheckJsonDepth;

// What a response_format schema can make the grammar converter build: its
// size, enum sizes and the repetition counts it unrolls (Limits); walks the
// schema with an explicit stack. InvalidArgument naming the limit.
Status CheckSchemaLimits(const nlohmann::json& schema);

}  // namespace kvb::batch
