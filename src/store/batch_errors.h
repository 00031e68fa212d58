// A batch's errors.data[] as both stores keep it: a JSON array of
// {code, message, param, line}, null param / line when not set.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "store/store.h"

namespace kvb::store {

// "[]" when there are none. Messages may quote client input: invalid UTF-8
// is replaced, not an error.
StatusOr<std::string> EncodeBatchErrors(const std::vector<BatchError>& errors);
// "" (a SQLite NULL) or "[]": none. Internal when the text is not such an array.
StatusOr<std::vector<BatchError>> DecodeBatchErrors(std::string_view text);

}  // namespace kvb::store
