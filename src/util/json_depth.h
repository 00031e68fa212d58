// Nesting depth of JSON text, found by a scan (no parse, no recursion), so
// that no input reaches a recursive parser, converter or serializer deeper
// than a limit. Shared by batch/ (lines, bodies) and engine/ (schemas).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "util/status.h"

namespace kvb {

// InvalidArgument naming the limit when `text` nests deeper than
// max_depth. Unbalanced or malformed text is left to the parser.
inline Status CheckJsonDepth(std::string_view text, int32_t max_depth) {
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

}  // namespace kvb
