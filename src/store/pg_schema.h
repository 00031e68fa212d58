// The PostgreSQL store's tables (pg_schema.cc), versioned in kvb_meta.
// Internal to src/store.
#pragma once

#include "store/pg_conn.h"
#include "util/status.h"

namespace kvb::store::pg {

inline constexpr int kSchemaVersion = 1;

// Creates the tables in an empty database, inside a transaction holding an
// advisory lock, so nodes starting together create them once.
// FailedPrecondition when the database has a newer schema version.
Status EnsureSchema(Conn& conn);

}  // namespace kvb::store::pg
