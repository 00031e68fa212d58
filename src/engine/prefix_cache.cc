#include "engine/prefix_cache.h"

#include <algorithm>
#include <cassert>

namespace kvb::engine {

struct PrefixCache::Node {
  std::vector<Token> edge;  // tokens on the edge from the parent to this node
  std::map<Token, std::unique_ptr<Node>> children;
  std::vector<int32_t> seqs;  // anchors whose tokens pass through or end here
};

namespace {

size_t CommonLength(std::span<const Token> a, std::span<const Token> b) {
  size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

}  // namespace

PrefixCache::PrefixCache() : root_(new Node) {}
PrefixCache::~PrefixCache() { delete root_; }

PrefixCache::Match PrefixCache::LongestWhole(std::span<const Token> tokens, size_t max_len) const {
  Match best;
  uint64_t best_used = 0;
  for (const auto& [seq, e] : entries_) {
    const size_t n = e.tokens.size();
    if (n == 0 || n > max_len || n > tokens.size()) continue;
    if (!std::equal(e.tokens.begin(), e.tokens.end(), tokens.begin())) continue;
    const auto len = static_cast<int32_t>(n);
    if (len > best.length || (len == best.length && e.last_used > best_used)) {
      best = Match{len, seq};
      best_used = e.last_used;
    }
  }
  return best;
}

PrefixCache::Match PrefixCache::Longest(std::span<const Token> tokens, size_t max_len) const {
  Match best;
  tokens = tokens.subspan(0, std::min(tokens.size(), max_len));
  const Node* node = root_;
  size_t depth = 0;
  while (depth < tokens.size()) {
    auto it = node->children.find(tokens[depth]);
    if (it == node->children.end()) break;
    const Node* child = it->second.get();
    size_t k = CommonLength(child->edge, tokens.subspan(depth));
    assert(k > 0 && !child->seqs.empty());
    best.length = static_cast<int32_t>(depth + k);
    // Prefer the most recently used anchor: it is the least likely to be evicted next.
    best.seq = *std::max_element(child->seqs.begin(), child->seqs.end(), [this](int32_t a, int32_t b) {
      return entries_.at(a).last_used < entries_.at(b).last_used;
    });
    if (k < child->edge.size()) break;
    depth += k;
    node = child;
  }
  return best;
}

void PrefixCache::Insert(int32_t seq, std::vector<Token> tokens) {
  assert(!entries_.count(seq));
  Node* node = root_;
  size_t depth = 0;
  std::span<const Token> all(tokens);
  while (depth < all.size()) {
    auto it = node->children.find(all[depth]);
    if (it == node->children.end()) {
      auto leaf = std::make_unique<Node>();
      leaf->edge.assign(all.begin() + depth, all.end());
      leaf->seqs.push_back(seq);
      node->children.emplace(all[depth], std::move(leaf));
      break;
    }
    Node* child = it->second.get();
    size_t k = CommonLength(child->edge, all.subspan(depth));
    if (k < child->edge.size()) {
      // Split the edge at k: a new middle node takes the common part.
      auto mid = std::make_unique<Node>();
      mid->edge.assign(child->edge.begin(), child->edge.begin() + k);
      mid->seqs = child->seqs;
      std::unique_ptr<Node> old = std::move(it->second);
      old->edge.erase(old->edge.begin(), old->edge.begin() + k);
      Token key = old->edge.front();
      mid->children.emplace(key, std::move(old));
      it->second = std::move(mid);
      child = it->second.get();
    }
    child->seqs.push_back(seq);
    depth += k;
    node = child;
  }
  entries_[seq] = Entry{std::move(tokens), 0, ++clock_};
}

void PrefixCache::Remove(int32_t seq) {
  auto e = entries_.find(seq);
  if (e == entries_.end()) return;
  std::span<const Token> all(e->second.tokens);
  Node* parent = root_;
  size_t depth = 0;
  while (depth < all.size()) {
    auto it = parent->children.find(all[depth]);
    assert(it != parent->children.end());
    Node* child = it->second.get();
    std::erase(child->seqs, seq);
    depth += child->edge.size();
    if (child->seqs.empty()) {  // nobody else passes here: drop the whole subtree
      parent->children.erase(it);
      break;
    }
    parent = child;
  }
  entries_.erase(e);
  Compact(root_);
}

// Merges every node that ends no anchor into its only child. The tree holds
// a handful of anchors, so a whole-tree pass costs nothing worth tracking.
void PrefixCache::Compact(Node* node) {
  for (auto& [_, child] : node->children) {
    Compact(child.get());
    if (child->children.size() != 1) continue;
    Node* only = child->children.begin()->second.get();
    std::vector<int32_t> a = child->seqs, b = only->seqs;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a != b) continue;
    std::unique_ptr<Node> grand = std::move(child->children.begin()->second);
    child->children.clear();
    child->edge.insert(child->edge.end(), grand->edge.begin(), grand->edge.end());
    child->children = std::move(grand->children);
  }
}

void PrefixCache::Acquire(int32_t seq) {
  Entry& e = entries_.at(seq);
  ++e.refs;
  e.last_used = ++clock_;
}

void PrefixCache::Release(int32_t seq) {
  auto it = entries_.find(seq);
  if (it == entries_.end()) return;
  assert(it->second.refs > 0);
  --it->second.refs;
}

int32_t PrefixCache::Refs(int32_t seq) const {
  auto it = entries_.find(seq);
  return it == entries_.end() ? 0 : it->second.refs;
}

void PrefixCache::Touch(int32_t seq) { entries_.at(seq).last_used = ++clock_; }

std::optional<int32_t> PrefixCache::LruIdle(int32_t keep) const {
  std::optional<int32_t> best;
  uint64_t best_time = UINT64_MAX;
  for (const auto& [seq, e] : entries_) {
    if (seq == keep || e.refs > 0) continue;
    if (e.last_used < best_time) {
      best_time = e.last_used;
      best = seq;
    }
  }
  return best;
}

size_t PrefixCache::NodeCount() const {
  size_t n = 0;
  std::vector<const Node*> stack{root_};
  while (!stack.empty()) {
    const Node* node = stack.back();
    stack.pop_back();
    for (const auto& [_, child] : node->children) {
      ++n;
      stack.push_back(child.get());
    }
  }
  return n;
}

}  // namespace kvb::engine
