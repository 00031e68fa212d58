// The /v1/embeddings request and response shapes (OpenAI's): `input` as a
// string, an array of strings, an array of token ids or an array of such
// arrays; the answer as {"object":"list","data":[{"object":"embedding",
// "index","embedding"}],"model","usage"}, floats or base64 float32.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "engine/types.h"
#include "util/status.h"

namespace kvb::batch {

// At most this many inputs in one request (OpenAI's limit).
inline constexpr size_t kMaxEmbeddingInputs = 2048;

// Reads body.input into texts or token arrays (exactly one gets filled).
// InvalidArgument names the problem; *param the field ("body.input[3]").
Status ParseEmbeddingInput(const nlohmann::json& body, std::vector<std::string>* texts,
                           std::vector<std::vector<engine::Token>>* tokens, std::string* param);

// The response body for a finished embeddings request.
nlohmann::json EmbeddingsBody(const engine::Result& r, bool base64, std::string_view model_name);

// Standard base64 of bytes.
std::string Base64(std::string_view bytes);

}  // namespace kvb::batch
