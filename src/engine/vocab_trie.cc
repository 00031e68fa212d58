#include "engine/vocab_trie.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "llama.h"

namespace kvb::engine {

namespace {

// Descend below a node only when at most this many of its children are
// viable (structure: quotes, colons, digits), at most this deep, and at most
// this many times per call (each descent clones the grammar state).
constexpr size_t kMaxFanout = 16;
constexpr int32_t kMaxDepth = 6;
constexpr int32_t kMaxDescents = 48;

std::string GrammarPiece(const llama_vocab* vocab, Token t) {
  char buf[128];
  int32_t n = llama_token_to_piece(vocab, t, buf, sizeof(buf), 0, /*special=*/true);
  if (n >= 0) return std::string(buf, static_cast<size_t>(n));
  std::string big(static_cast<size_t>(-n), '\0');
  n = llama_token_to_piece(vocab, t, big.data(), static_cast<int32_t>(big.size()), 0, true);
  big.resize(static_cast<size_t>(std::max(0, n)));
  return big;
}

bool Rejected(const llama_token_data& d) { return std::isinf(d.logit) && d.logit < 0; }

}  // namespace

struct VocabTrie::Walk {
  std::vector<Token>* out;
  std::vector<Token> unsure;  // checked by the grammar one by one at the end
  int32_t descents = kMaxDescents;
};

std::unique_ptr<VocabTrie> VocabTrie::Build(const llama_vocab* vocab) {
  std::unique_ptr<VocabTrie> t(new VocabTrie);
  std::fill(std::begin(t->probe_), std::end(t->probe_), -1);
  const int32_t n_vocab = llama_vocab_n_tokens(vocab);
  std::vector<std::pair<std::string, Token>> pieces;
  pieces.reserve(n_vocab);
  t->pieces_.resize(n_vocab);
  for (Token id = 0; id < n_vocab; ++id) {
    if (llama_vocab_is_eog(vocab, id)) {
      t->eog_.push_back(id);
      continue;
    }
    std::string p = GrammarPiece(vocab, id);
    t->pieces_[id] = p;
    if (p.empty() || p[0] == '\0') {
      t->unprobed_.push_back(id);
      continue;
    }
    if (p.size() == 1 && t->probe_[static_cast<uint8_t>(p[0])] < 0) t->probe_[static_cast<uint8_t>(p[0])] = id;
    pieces.emplace_back(std::move(p), id);
  }
  std::sort(pieces.begin(), pieces.end());
  t->tokens_.reserve(pieces.size());
  for (auto& [_, id] : pieces) t->tokens_.push_back(id);

  // Sorted pieces: every node's tokens are a contiguous range; build the
  // nodes by splitting ranges on the byte at each depth.
  t->nodes_.push_back(Node{0, static_cast<int32_t>(pieces.size()), 0, {}});
  struct Pending {
    int32_t node;
    size_t depth;
  };
  std::vector<Pending> stack{{0, 0}};
  while (!stack.empty()) {
    const Pending p = stack.back();
    stack.pop_back();
    int32_t i = t->nodes_[p.node].begin;
    const int32_t end = t->nodes_[p.node].end;
    while (i < end && pieces[i].first.size() == p.depth) ++i;  // sorted: exact matches come first
    t->nodes_[p.node].exact = i - t->nodes_[p.node].begin;
    while (i < end) {
      const auto byte = static_cast<uint8_t>(pieces[i].first[p.depth]);
      int32_t j = i;
      while (j < end && static_cast<uint8_t>(pieces[j].first[p.depth]) == byte) ++j;
      const auto child = static_cast<int32_t>(t->nodes_.size());
      t->nodes_.push_back(Node{i, j, 0, {}});
      t->nodes_[p.node].children.emplace_back(byte, child);
      stack.push_back({child, p.depth + 1});
      i = j;
    }
  }
  return t;
}

void VocabTrie::Visit(Walk& w, int32_t node, const llama_sampler* state, int32_t depth) const {
  const Node& n = nodes_[node];
  std::vector<llama_token_data> probes;
  probes.reserve(n.children.size());
  for (auto [byte, child] : n.children)
    if (probe_[byte] >= 0) probes.push_back({probe_[byte], 0.0f, 0.0f});
  llama_token_data_array arr{probes.data(), probes.size(), -1, false};
  llama_sampler_apply(const_cast<llama_sampler*>(state), &arr);  // apply only reads the grammar state

  size_t viable = 0;
  for (const auto& p : probes) viable += !Rejected(p);
  size_t k = 0;
  for (auto [byte, child] : n.children) {
    const Node& c = nodes_[child];
    if (probe_[byte] < 0) {  // cannot ask about this byte alone: ask about each token
      w.unsure.insert(w.unsure.end(), tokens_.begin() + c.begin, tokens_.begin() + c.end);
      continue;
    }
    if (Rejected(probes[k++])) continue;
    // The byte is viable after this node's prefix: tokens ending here are allowed.
    w.out->insert(w.out->end(), tokens_.begin() + c.begin, tokens_.begin() + c.begin + c.exact);
    if (c.children.empty()) continue;
    if (viable <= kMaxFanout && depth + 1 < kMaxDepth && w.descents > 0) {
      --w.descents;
      llama_sampler* next = llama_sampler_clone(state);
      llama_sampler_accept(next, probe_[byte]);
      Visit(w, child, next, depth + 1);
      llama_sampler_free(next);
    } else {
      w.unsure.insert(w.unsure.end(), tokens_.begin() + c.begin + c.exact, tokens_.begin() + c.end);
    }
  }
}

void VocabTrie::Allowed(const llama_sampler* grammar, std::vector<Token>* out) const {
  Walk w{out, {}, kMaxDescents};
  w.unsure = eog_;
  Visit(w, 0, grammar, 0);
  if (w.unsure.empty()) return;
  std::vector<llama_token_data> cands;
  cands.reserve(w.unsure.size());
  for (Token t : w.unsure) cands.push_back({t, 0.0f, 0.0f});
  llama_token_data_array arr{cands.data(), cands.size(), -1, false};
  llama_sampler_apply(const_cast<llama_sampler*>(grammar), &arr);
  for (const auto& c : cands)
    if (!Rejected(c)) out->push_back(c.id);
}

}  // namespace kvb::engine
