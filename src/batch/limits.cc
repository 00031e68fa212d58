#include "batch/limits.h"

#include <atomic>
#include <string>

namespace kvb::batch {

namespace {
Limits g_limits;
}  // namespace

const Limits& GetLimits() { return g_limits; }
void SetLimits(const Limits& limits) { g_limits = limits; }

Status CheckJsonDepth(std::string_view text, int32_t max_depth) {
  int64_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        return Status::InvalidArgument("JSON is nested deeper than " + std::to_string(max_depth) +
                                       " levels (the nesting depth limit, --max-json-depth)");
    } else if (c == ']' || c == '}') {
      if (depth > 0) --depth;
    }
  }
  return Status::Ok();
}

}  // namespace kvb::batch
