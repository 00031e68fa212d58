#include "store/open_store.h"

#include "store/pg_store.h"
#include "store/sqlite_store.h"

namespace kvb::store {

bool IsPostgresUri(const std::string& uri) {
  return uri.rfind("postgresql://", 0) == 0 || uri.rfind("postgres://", 0) == 0;
}

StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& uri, const std::string& files_dir) {
  if (IsPostgresUri(uri)) {
    auto pg = PgStore::Open(uri);
    if (!pg.ok()) return pg.status();
    return std::unique_ptr<Store>(std::move(pg).value());
  }
  auto lite = SqliteStore::Open(uri, files_dir);
  if (!lite.ok()) return lite.status();
  return std::unique_ptr<Store>(std::move(lite).value());
}

}  // namespace kvb::store
