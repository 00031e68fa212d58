// The web dashboard's files (web/ in the source tree), compiled into the
// binary by cmake/embed_assets.cmake: `kvbatch serve` needs nothing on disk.
#pragma once

#include <span>
#include <string_view>

namespace kvb::web {

struct Asset {
  std::string_view path;  // relative to web/, e.g. "index.html", "js/app.js"
  std::string_view data;
};

// Every embedded file, sorted by path.
std::span<const Asset> Assets();

}  // namespace kvb::web
