// Tokenizing a long shared start once: requests of a batch share a system
// message (the 2,000-token rubric) and differ after it; tokenizing each whole
// rendered prompt costs milliseconds of CPU per request, most of it on the
// shared part. PrefixTokens keeps the tokens of a prompt's start, up to and
// including the first boundary after the shared text, and tokenizes only the
// rest.
//
// Why the result is the same as tokenizing the whole text: llama.cpp splits
// the text at special tokens first and tokenizes the pieces between them on
// their own. The rest is tokenized *with* the boundary's special token in
// front (then dropped), so what depends on the token before a piece (SPM's
// leading space, a special token's rstrip) is reproduced.
//
// A template whose turn markers are plain text (Llama 2's [INST] and
// <<SYS>>, ChatML on a vocabulary without its tokens) has no special token
// there. An SPM tokenizer merges adjacent characters only into vocabulary
// tokens, so a character that no token holds together with another (the
// newline, in vocabularies that spell it as a byte token) is never joined to
// its neighbours: the text splits after it exactly. The rest is tokenized
// with that character in front, and its tokens there (with the leading
// space) dropped.
//
// Every cached start is still checked against whole-text tokenization on its
// first uses; a mismatch retires it (whole-text tokenization from then on).
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/types.h"

struct llama_vocab;

namespace kvb::engine {

// A vocabulary's control and user-defined tokens, as (text, id): the texts
// llama.cpp splits a prompt at before tokenizing the pieces between them.
std::vector<std::pair<std::string, Token>> SpecialTokenTexts(const llama_vocab* vocab);

// Texts a vocabulary's tokenizer never joins to the text around them: for an
// SPM vocabulary, the newline when no token holds it with another character;
// none otherwise (BPE pre-tokenizers keep newlines with their neighbours).
std::vector<std::string> SplitTexts(const llama_vocab* vocab);

class PrefixTokens {
 public:
  // tokenize(text, add_special): the model's tokenizer, special tokens parsed.
  using TokenizeFn = std::function<std::vector<Token>(std::string_view, bool)>;
  struct Options {
    size_t capacity = 8;        // cached starts, least recently used dropped
    size_t min_shared = 512;    // shorter shared texts are not worth it (bytes)
    size_t max_gap = 64;        // bytes between the shared text and the special token
    size_t max_offset = 65536;  // bytes of the text before the shared text (template, tools)
    int32_t verify_uses = 2;    // uses of a start checked against whole-text tokenization
    std::vector<std::string> splits;  // boundaries besides special tokens (SplitTexts)
  };
  struct Stats {
    int64_t hits = 0;        // the start came from the cache
    int64_t misses = 0;      // the start was tokenized and cached
    int64_t whole = 0;       // no usable boundary: the whole text was tokenized
    int64_t mismatches = 0;  // a check failed: that start is no longer used
  };

  // specials: the vocabulary's special tokens' texts and ids (control and
  // user-defined tokens: those llama.cpp splits the text at).
  PrefixTokens(TokenizeFn tokenize, std::vector<std::pair<std::string, Token>> specials, Options options);
  PrefixTokens(TokenizeFn tokenize, std::vector<std::pair<std::string, Token>> specials);

  // The tokens of `text` (tokenize(text, true)); `shared` is text expected
  // near its start that other prompts share (a system message).
  std::vector<Token> Tokenize(std::string_view text, std::string_view shared);
  Stats stats() const;

 private:
  struct Entry {
    std::string text;
    std::vector<Token> tokens;
    int32_t checked = 0;
    bool bad = false;
  };
  // A boundary: a special token's text, or a split text.
  struct Marker {
    std::string text;
    std::vector<Token> lead;  // its tokens at the start of a piece: a special token itself; a split
                              // text's own tokenization (with SPM's leading space)
  };
  // The first boundary starting at most max_gap bytes after `from`: its
  // index in markers_ and the end of its text; {-1, 0} when none.
  std::pair<int32_t, size_t> Boundary(std::string_view text, size_t from) const;
  // Records a start and what became of it (under mu_).
  void Record(std::string_view start, const std::vector<Token>& tokens, bool fresh, bool checked, bool bad);

  TokenizeFn tokenize_;
  std::vector<Marker> markers_;  // special tokens, longest first, then split texts
  Options options_;
  mutable std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  Stats stats_;
};

}  // namespace kvb::engine
