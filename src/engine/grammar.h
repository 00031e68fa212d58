// Structured output: JSON schemas to GBNF grammars (llama.cpp's common
// library, as llama-server's response_format does), and checking that a
// grammar parses before a request runs with it.
#pragma once

#include <string>
#include <string_view>

#include "engine/model.h"
#include "util/status.h"

namespace kvb::engine {

// The GBNF grammar (root rule "root") of JSON text valid against the schema
// (JSON text; object properties are generated in the order written).
// InvalidArgument with the converter's message for a schema it cannot handle
// (unresolved $ref, invalid JSON, ...); FailedPrecondition when kvbatch was
// built without llama.cpp's common library. Thread-safe; results are cached
// by schema text (a job usually sends one schema thousands of times).
StatusOr<std::string> JsonSchemaToGrammar(std::string_view schema_json);

// The grammar of any JSON object (response_format {"type":"json_object"}):
// the converter's grammar for the schema {"type":"object"}.
StatusOr<std::string> JsonObjectGrammar();

// OK when llama.cpp parses `gbnf` for this model's vocabulary (so
// Backend::NewSampler will succeed); InvalidArgument otherwise. Thread-safe,
// cached by grammar text.
Status CheckGrammar(const Model& model, const std::string& gbnf);

}  // namespace kvb::engine
