// The SQLite store's schema and its version (PRAGMA user_version), so a later
// kvbatch can migrate a database written by an earlier one.
#pragma once

#include <string>

#include "util/status.h"

struct sqlite3;

namespace kvb::store::sqlite {

// The schema version this code writes and reads.
inline constexpr int kSchemaVersion = 3;

// Brings the database on `db` to kSchemaVersion in one transaction: creates
// the tables in a new database (version 0); migrations from older versions
// go here. FailedPrecondition for a database of a newer version. `path` is
// for messages only.
Status EnsureSchema(sqlite3* db, const std::string& path);

}  // namespace kvb::store::sqlite
