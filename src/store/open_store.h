// Opens the store a --store flag names: a postgresql:// (or postgres://)
// URI is PostgreSQL (pg_store.h), shared by any number of nodes; anything
// else is the path of an embedded SQLite database (sqlite_store.h) for one
// process, its file content under `files_dir`.
#pragma once

#include <memory>
#include <string>

#include "store/store.h"

namespace kvb::store {

bool IsPostgresUri(const std::string& uri);

StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& uri, const std::string& files_dir);

}  // namespace kvb::store
