// The JSON shapes of the OpenAI File and Batch objects (DESIGN.md section 3).
#pragma once

#include <nlohmann/json.hpp>
#include <optional>

#include "store/store.h"
#include "worker/driver_options.h"

namespace kvb::api {

// {"id","object":"file","bytes","created_at","expires_at","filename","purpose","status":"processed","status_details":null}
nlohmann::json FileObject(const store::FileRecord& f);

// Every field of OpenAI's Batch object; unset times and ids are null, errors
// is null when there are none. Extensions live under the one key "kvbatch"
// (priority, paused, and the live progress figures), which SDKs ignore.
nlohmann::json BatchObject(const store::BatchRecord& b, const std::optional<worker::BatchProgress>& progress);

// {"object":"list","data":[...],"first_id","last_id","has_more"}
nlohmann::json ListObject(nlohmann::json data, bool has_more);

}  // namespace kvb::api
