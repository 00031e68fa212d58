// The tokens a grammar allows next, without asking the grammar about every
// token of the vocabulary.
//
// llama.cpp's grammar sampler checks candidates one by one (decoding each
// token's text), ~32,000 of them per step for a Llama vocabulary: several
// milliseconds, more than a decode step's share per sequence. Structured
// output only needs that when the model's own pick is rejected, which a
// real model rarely does but a random or weakly instructed one does all the
// time. VocabTrie walks a byte trie of the tokens' text instead: it asks the
// grammar which next bytes are possible (one probe token per byte), descends
// only where few are, and hands the grammar only the tokens under the
// surviving prefixes. The answer is exactly the set llama.cpp's apply would
// leave: a token is allowed iff its whole text is a viable continuation, and
// viability is prefix-closed (a rejected prefix rejects every extension).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/types.h"

struct llama_sampler;
struct llama_vocab;

namespace kvb::engine {

class VocabTrie {
 public:
  // Over the tokens' text as llama.cpp's grammar sees it (special tokens
  // rendered); end-of-generation tokens are kept apart (the grammar allows
  // them only when it is complete).
  static std::unique_ptr<VocabTrie> Build(const llama_vocab* vocab);

  // Appends to *out every token `grammar` (a grammar sampler in its current
  // state; not modified) allows next, in no particular order. Thread-safe
  // (the trie is read-only); scratch space is the caller's.
  void Allowed(const llama_sampler* grammar, std::vector<Token>* out) const;

  // A token's text as the grammar sees it (empty for end-of-generation tokens).
  const std::string& Piece(Token t) const { return pieces_[static_cast<size_t>(t)]; }

 private:
  struct Node {
    int32_t begin = 0, end = 0;  // tokens_[begin, end): tokens under this node (pieces with this prefix)
    int32_t exact = 0;           // the first `exact` of them end here
    std::vector<std::pair<uint8_t, int32_t>> children;  // by byte, ascending
  };
  struct Walk;

  void Visit(Walk& w, int32_t node, const llama_sampler* state, int32_t depth) const;

  std::vector<Node> nodes_;           // nodes_[0] is the root
  std::vector<Token> tokens_;         // sorted by piece: each node's tokens are contiguous
  std::vector<Token> eog_;            // end-of-generation tokens
  std::vector<Token> unprobed_;       // tokens with an empty piece (the grammar rejects them)
  std::vector<std::string> pieces_;   // by token id
  Token probe_[256];                  // a token whose piece is exactly that byte; -1 when none
};

}  // namespace kvb::engine
