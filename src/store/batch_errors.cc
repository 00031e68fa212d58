#include "store/batch_errors.h"

#include <nlohmann/json.hpp>

namespace kvb::store {

StatusOr<std::string> EncodeBatchErrors(const std::vector<BatchError>& errors) {
  try {
    nlohmann::json arr = nlohmann::json::array();
    for (const BatchError& e : errors) {
      arr.push_back({{"code", e.code},
                     {"message", e.message},
                     {"param", e.param.empty() ? nlohmann::json(nullptr) : nlohmann::json(e.param)},
                     {"line", e.line == 0 ? nlohmann::json(nullptr) : nlohmann::json(e.line)}});
    }
    return arr.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } catch (const std::exception& e) {
    return Status::Internal(std::string("encode batch errors: ") + e.what());
  }
}

StatusOr<std::vector<BatchError>> DecodeBatchErrors(std::string_view text) {
  std::vector<BatchError> errors;
  if (text.empty()) return errors;
  try {
    for (const nlohmann::json& j : nlohmann::json::parse(text)) {
      BatchError e;
      e.code = j.at("code").get<std::string>();
      e.message = j.at("message").get<std::string>();
      if (j.contains("param") && !j["param"].is_null()) e.param = j["param"].get<std::string>();
      if (j.contains("line") && !j["line"].is_null()) e.line = j["line"].get<int64_t>();
      errors.push_back(std::move(e));
    }
  } catch (const std::exception& e) {
    return Status::Internal(std::string("stored batch errors are not valid: ") + e.what());
  }
  return errors;
}

}  // namespace kvb::store
