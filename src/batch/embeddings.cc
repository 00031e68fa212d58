#include "batch/embeddings.h"

#include <cstring>

#include "batch/limits.h"

namespace kvb::batch {

using nlohmann::json;

Status ParseEmbeddingInput(const json& body, std::vector<std::string>* texts,
                           std::vector<std::vector<engine::Token>>* tokens, std::string* param) {
  *param = "body.input";
  auto it = body.find("input");
  if (it == body.end() || it->is_null()) return Status::InvalidArgument("body.input is missing");
  const json& in = *it;
  const int64_t max_bytes = GetLimits().max_prompt_bytes;
  const std::string shape = "body.input must be a string, an array of strings, an array of token ids or an array "
                            "of arrays of token ids";
  auto token_array = [&](const json& a, const std::string& where, std::vector<engine::Token>* out) -> Status {
    if (a.empty()) return Status::InvalidArgument(where + " must not be empty");
    if (static_cast<int64_t>(a.size()) > max_bytes / 4)
      return Status::InvalidArgument(where + " has " + std::to_string(a.size()) + " tokens, over the limit");
    out->reserve(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      const json& t = a[i];
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
        *param = where + "[" + std::to_string(i) + "]";
        return Status::InvalidArgument(*param + " must be a token id (a non-negative integer)");
      }
      out->push_back(static_cast<engine::Token>(t.get<int64_t>()));
    }
    return Status::Ok();
  };
  if (in.is_string()) {
    if (in.get_ref<const std::string&>().empty()) return Status::InvalidArgument("body.input must not be empty");
    if (static_cast<int64_t>(in.get_ref<const std::string&>().size()) > max_bytes)
      return Status::InvalidArgument("body.input is over the prompt size limit of " + std::to_string(max_bytes) +
                                     " bytes");
    texts->push_back(in.get<std::string>());
    return Status::Ok();
  }
  if (!in.is_array() || in.empty()) return Status::InvalidArgument(in.is_array() ? "body.input must not be empty" : shape);
  if (in.size() > kMaxEmbeddingInputs)
    return Status::InvalidArgument("body.input has " + std::to_string(in.size()) + " inputs, over the limit of " +
                                   std::to_string(kMaxEmbeddingInputs));
  if (in[0].is_number()) {
    tokens->emplace_back();
    return token_array(in, "body.input", &tokens->back());
  }
  int64_t total = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const json& x = in[i];
    const std::string where = "body.input[" + std::to_string(i) + "]";
    if (x.is_string() && tokens->empty()) {
      if (x.get_ref<const std::string&>().empty()) {
        *param = where;
        return Status::InvalidArgument(where + " must not be empty");
      }
      total += static_cast<int64_t>(x.get_ref<const std::string&>().size());
      texts->push_back(x.get<std::string>());
    } else if (x.is_array() && texts->empty()) {
      tokens->emplace_back();
      if (Status st = token_array(x, where, &tokens->back()); !st.ok()) {
        if (*param == "body.input") *param = where;
        return st;
      }
      total += static_cast<int64_t>(x.size()) * 4;
    } else {
      *param = where;
      return Status::InvalidArgument(shape + " (all of one kind)");
    }
    if (total > max_bytes)
      return Status::InvalidArgument("body.input is over the prompt size limit of " + std::to_string(max_bytes) +
                                     " bytes");
  }
  return Status::Ok();
}

std::string Base64(std::string_view in) {
  static constexpr char kTable[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += kTable[(v >> s) & 63];
  }
  if (i < in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    if (i + 1 < in.size()) v |= uint8_t(in[i + 1]) << 8;
    out += kTable[(v >> 18) & 63];
    out += kTable[(v >> 12) & 63];
    out += i + 1 < in.size() ? kTable[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

json EmbeddingsBody(const engine::Result& r, bool base64, std::string_view model_name) {
  json data = json::array();
  for (size_t i = 0; i < r.embeddings.size(); ++i) {
    const std::vector<float>& v = r.embeddings[i];
    json e = {{"object", "embedding"}, {"index", i}};
    if (base64) {
      std::string bytes(v.size() * sizeof(float), '\0');  // little-endian float32, as OpenAI sends
      std::memcpy(bytes.data(), v.data(), bytes.size());
      e["embedding"] = Base64(bytes);
    } else {
      e["embedding"] = v;
    }
    data.push_back(std::move(e));
  }
  return json{{"object", "list"},
              {"data", std::move(data)},
              {"model", model_name},
              {"usage", {{"prompt_tokens", r.prompt_tokens}, {"total_tokens", r.prompt_tokens}}}};
}

}  // namespace kvb::batch
