// The real Sampler, on llama.cpp's sampler API: a greedy argmax fast path,
// llama.cpp's sampler chain otherwise, and an optional grammar checked the
// way llama-server does it (sample first, constrain only when rejected).
#pragma once

#include <memory>

#include "engine/backend.h"

struct llama_sampler;

namespace kvb::engine {

class VocabTrie;

// `grammar`: a grammar sampler (llama_sampler_init_grammar) that the new
// sampler clones, or null for unconstrained output. p.grammar is not parsed
// here: parsing once per distinct grammar is the caller's job. `trie`
// (optional, outlives the sampler) finds the allowed tokens when the
// grammar rejects a pick; without it the grammar checks the whole vocabulary.
std::unique_ptr<Sampler> NewLlamaSampler(int32_t n_vocab, const SamplingParams& p, const llama_sampler* grammar,
                                         const VocabTrie* trie = nullptr);

}  // namespace kvb::engine
