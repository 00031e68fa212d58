#include "batch/limits.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kvb::batch {

namespace {
Limits g_limits;
}  // namespace

const Limits& GetLimits() { return g_limits; }
void SetLimits(const Limits& limits) { g_limits = limits; }

namespace {

int64_t LargestQuantifier(std::string_view re) {
  int64_t best = 0;
  for (size_t i = 0; i < re.size(); ++i) {
    if (re[i] != '{' || (i > 0 && re[i - 1] == '\\')) continue;
    int64_t n = 0;
    for (size_t j = i + 1; j < re.size(); ++j) {
      const char c = re[j];
      if (c >= '0' && c <= '9') {
        n = n * 10 + (c - '0');
        if (n >= (int64_t{1} << 40)) return n;  // absurd: no need to read on
      } else {
        if (c == ',' || c == '}') best = std::max(best, n);
        if (c != ',') break;
        n = 0;
      }
    }
  }
  return best;
}

}  // namespace

// Bounds what a schema can make the grammar converter build: its size,
// enum sizes and the repetition counts it unrolls. Walks the schema with an
// explicit stack (its depth is already bounded by Limits::max_json_depth).
Status CheckSchemaLimits(const nlohmann::json& schema) {
  const Limits& limits = GetLimits();
  const std::string text = schema.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (static_cast<int64_t>(text.size()) > limits.max_schema_bytes)
    return Status::InvalidArgument("the schema has " + std::to_string(text.size()) + " bytes, over the limit of " +
                                   std::to_string(limits.max_schema_bytes));
  static constexpr const char* kCounts[] = {"minItems",      "maxItems",      "minLength",   "maxLength",
                                            "minProperties", "maxProperties", "minContains", "maxContains"};
  std::vector<const nlohmann::json*> todo = {&schema};
  while (!todo.empty()) {
    const nlohmann::json* node = todo.back();
    todo.pop_back();
    if (node->is_array()) {
      for (const nlohmann::json& child : *node) todo.push_back(&child);
      continue;
    }
    if (!node->is_object()) continue;
    for (const char* key : kCounts) {
      auto it = node->find(key);
      if (it == node->end() || !it->is_number()) continue;
      if (it->get<double>() > static_cast<double>(limits.max_schema_repetition))
        return Status::InvalidArgument(std::string("the schema's ") + key + " is " + it->dump() +
                                       ", over the limit of " + std::to_string(limits.max_schema_repetition));
    }
    if (auto it = node->find("enum"); it != node->end() && it->is_array() &&
                                      it->size() > static_cast<size_t>(limits.max_schema_enum))
      return Status::InvalidArgument("the schema has an enum of " + std::to_string(it->size()) +
                                     " values, over the limit of " + std::to_string(limits.max_schema_enum));
    if (auto it = node->find("pattern"); it != node->end() && it->is_string() &&
                                         LargestQuantifier(it->get_ref<const std::string&>()) >
                                             limits.max_schema_repetition)
      return Status::InvalidArgument("the schema's pattern repeats more than " +
                                     std::to_string(limits.max_schema_repetition) + " times");
    for (const auto& [_, child] : node->items()) todo.push_back(&child);
  }
  return Status::Ok();
}

}  // namespace kvb::batch
