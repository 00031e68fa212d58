// A radix tree over token ids of the prefixes resident in the KV cache.
//
// Each entry is an "anchor": a sequence id whose KV cells hold exactly the
// entry's tokens at positions [0, n). A request whose prompt starts with
// (part of) an entry forks those cells into its own sequence with
// llama_memory_seq_cp, which shares cells instead of copying them. Any
// anchor whose path passes through a tree node holds that node's prefix, so
// a match that ends inside an edge still names a usable anchor.
//
// Refcounts count live requests forked from an anchor; only anchors with no
// references are offered for eviction (evicting a referenced anchor would
// not free its cells, which the forks still hold).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "engine/types.h"

namespace kvb::engine {

class PrefixCache {
 public:
  struct Match {
    int32_t length = 0;  // tokens of the query that are resident
    int32_t seq = -1;    // an anchor holding them; -1 when length == 0
  };

  PrefixCache();
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // The longest resident prefix of `tokens`, at most `max_len` tokens long.
  // Among anchors covering it, the most recently used one is returned.
  Match Longest(std::span<const Token> tokens, size_t max_len) const;
  // As Longest, but only whole entries: the longest anchor all of whose
  // tokens begin `tokens` (for memory that can fork only at an anchor's end).
  Match LongestWhole(std::span<const Token> tokens, size_t max_len) const;

  // Registers `seq` as holding `tokens`. `seq` must not be registered.
  void Insert(int32_t seq, std::vector<Token> tokens);
  // Unregisters `seq`; splits made for it are merged back where possible.
  void Remove(int32_t seq);
  bool Contains(int32_t seq) const { return entries_.count(seq) != 0; }

  void Acquire(int32_t seq);
  void Release(int32_t seq);
  int32_t Refs(int32_t seq) const;
  void Touch(int32_t seq);

  // The least recently used anchor without references, other than `keep`.
  std::optional<int32_t> LruIdle(int32_t keep = -1) const;

  size_t size() const { return entries_.size(); }
  const std::vector<Token>& Tokens(int32_t seq) const { return entries_.at(seq).tokens; }
  size_t NodeCount() const;

 private:
  struct Node;
  struct Entry {
    std::vector<Token> tokens;
    int32_t refs = 0;
    uint64_t last_used = 0;
  };

  static void Compact(Node* node);

  Node* root_;
  std::unordered_map<int32_t, Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace kvb::engine
