// The order in which a batch's requests are fed to the engine, shared by
// `kvbatch run` and the server's worker.
#pragma once

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace kvb::batch {

// Requests sharing a prefix run together: stably groups `items` by
// `prefix_hash(item)`, groups in order of first appearance, input order
// within a group (DESIGN.md section 2: order by shared prefix).
template <class T, class PrefixHash>
void GroupBySharedPrefix(std::vector<T>& items, PrefixHash prefix_hash) {
  std::unordered_map<uint64_t, size_t> first;
  for (const T& item : items) first.emplace(prefix_hash(item), first.size());
  std::stable_sort(items.begin(), items.end(),
                   [&](const T& a, const T& b) { return first[prefix_hash(a)] < first[prefix_hash(b)]; });
}

}  // namespace kvb::batch
