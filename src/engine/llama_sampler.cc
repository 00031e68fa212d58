#include "engine/llama_sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "engine/vocab_trie.h"
#include "llama.h"

namespace kvb::engine {

namespace {

bool Rejected(const llama_token_data& d) { return std::isinf(d.logit) && d.logit < 0; }

// Candidates examined first when the grammar rejects a greedy pick: if any
// of the best kGreedyWindow tokens is allowed, the best of them is the
// constrained argmax (every other token scores lower), at the cost of
// checking 64 tokens instead of the whole vocabulary.
constexpr size_t kGreedyWindow = 64;

// Greedy (temperature 0, no penalties) or llama.cpp's chain: logit bias,
// penalties, top-k, top-p, min-p, temperature, then a draw from the
// request's own RNG. With a grammar: the unconstrained pick is checked
// against the grammar alone (one token); only when it is rejected is the
// grammar applied to the candidates and the pick redone. The result is the
// pick from the grammar-masked distribution either way; the common case
// (the model already follows the format) costs one token check.
class LlamaSampler : public Sampler {
 public:
  LlamaSampler(int32_t n_vocab, const SamplingParams& p, const llama_sampler* grammar, const VocabTrie* trie)
      : n_vocab_(n_vocab), trie_(trie) {
    const bool penalties = p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    greedy_ = (p.temperature <= 0.0f || p.top_k == 1) && !penalties;
    if (grammar) grammar_ = llama_sampler_clone(grammar);
    if (greedy_) {
      if (!p.logit_bias.empty()) {
        bias_.assign(n_vocab, 0.0f);
        for (auto [t, b] : p.logit_bias)
          if (t >= 0 && t < n_vocab) bias_[t] += b;
      }
      return;
    }
    cur_.resize(n_vocab);
    chain_ = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (!p.logit_bias.empty()) {
      std::vector<llama_logit_bias> bias;
      for (auto [t, b] : p.logit_bias) bias.push_back({t, b});
      llama_sampler_chain_add(chain_, llama_sampler_init_logit_bias(n_vocab, static_cast<int32_t>(bias.size()), bias.data()));
    }
    if (penalties) {
      const int32_t last_n = p.max_tokens > 0 ? p.max_tokens : 4096;
      llama_sampler_chain_add(chain_, llama_sampler_init_penalties(n_vocab, last_n, 1.0f, p.frequency_penalty, p.presence_penalty));
    }
    if (p.temperature <= 0.0f) {
      llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
      return;
    }
    if (p.top_k > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(p.top_k));
    if (p.top_p < 1.0f) llama_sampler_chain_add(chain_, llama_sampler_init_top_p(p.top_p, 1));
    if (p.min_p > 0.0f) llama_sampler_chain_add(chain_, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(chain_, llama_sampler_init_temp(p.temperature));
    const uint32_t seed = static_cast<uint32_t>(p.seed ^ (p.seed >> 32));
    llama_sampler_chain_add(chain_, llama_sampler_init_dist(seed));
  }
  ~LlamaSampler() override {
    if (chain_) llama_sampler_free(chain_);
    if (grammar_) llama_sampler_free(grammar_);
  }

  Token Sample(const float* logits) override {
    Token t = greedy_ ? Argmax(logits) : Draw(logits, false);
    if (grammar_ && !Allowed(t)) t = greedy_ ? ConstrainedArgmax(logits) : Draw(logits, true);
    if (t == kNoToken) return t;
    if (grammar_) llama_sampler_accept(grammar_, t);
    if (chain_) llama_sampler_accept(chain_, t);
    return t;
  }

 private:
  float Biased(const float* logits, Token i) const { return bias_.empty() ? logits[i] : logits[i] + bias_[i]; }

  Token Argmax(const float* logits) const {
    Token best = 0;
    float best_v = -std::numeric_limits<float>::infinity();
    if (bias_.empty()) {
      for (int32_t i = 0; i < n_vocab_; ++i)
        if (logits[i] > best_v) best_v = logits[i], best = i;
    } else {
      for (int32_t i = 0; i < n_vocab_; ++i)
        if (const float v = logits[i] + bias_[i]; v > best_v) best_v = v, best = i;
    }
    return best;
  }

  // Whether the grammar accepts token t next (a one-candidate apply).
  bool Allowed(Token t) {
    llama_token_data d{t, 0.0f, 0.0f};
    llama_token_data_array one{&d, 1, -1, false};
    llama_sampler_apply(grammar_, &one);
    return !Rejected(d);
  }

  // The best token the grammar allows, or kNoToken.
  Token ConstrainedArgmax(const float* logits) {
    const size_t k = std::min(kGreedyWindow, static_cast<size_t>(n_vocab_));
    std::vector<llama_token_data> top;
    top.reserve(k + 1);
    // A bounded min-heap of the k best.
    auto worse = [](const llama_token_data& a, const llama_token_data& b) { return a.logit > b.logit; };
    for (int32_t i = 0; i < n_vocab_; ++i) {
      const float v = Biased(logits, i);
      if (top.size() < k) {
        top.push_back({i, v, 0.0f});
        std::push_heap(top.begin(), top.end(), worse);
      } else if (v > top.front().logit) {
        std::pop_heap(top.begin(), top.end(), worse);
        top.back() = {i, v, 0.0f};
        std::push_heap(top.begin(), top.end(), worse);
      }
    }
    llama_token_data_array arr{top.data(), top.size(), -1, false};
    llama_sampler_apply(grammar_, &arr);
    Token best = kNoToken;
    float best_v = -std::numeric_limits<float>::infinity();
    for (const auto& d : top)
      if (!Rejected(d) && (best == kNoToken || d.logit > best_v)) best_v = d.logit, best = d.id;
    if (best != kNoToken) return best;
    AllowedTokens();
    for (Token t : allowed_)
      if (const float v = Biased(logits, t); best == kNoToken || v > best_v || (v == best_v && t < best)) best_v = v, best = t;
    return best;
  }

  // allowed_ = every token the grammar allows next.
  void AllowedTokens() {
    allowed_.clear();
    if (trie_) {
      trie_->Allowed(grammar_, &allowed_);
      return;
    }
    std::vector<llama_token_data> all(n_vocab_);
    for (int32_t i = 0; i < n_vocab_; ++i) all[i] = {i, 0.0f, 0.0f};
    llama_token_data_array arr{all.data(), all.size(), -1, false};
    llama_sampler_apply(grammar_, &arr);
    for (const auto& d : all)
      if (!Rejected(d)) allowed_.push_back(d.id);
  }

  // A pick from the chain; with `constrained`, from the tokens the grammar
  // allows (the others are left out, as if their probability were 0).
  Token Draw(const float* logits, bool constrained) {
    if (constrained) {
      AllowedTokens();
      if (allowed_.empty()) return kNoToken;
      std::sort(allowed_.begin(), allowed_.end());  // a stable order: same draws for the same logits
      cur_.resize(allowed_.size());
      for (size_t i = 0; i < allowed_.size(); ++i) cur_[i] = llama_token_data{allowed_[i], logits[allowed_[i]], 0.0f};
    } else {
      cur_.resize(n_vocab_);
      for (int32_t i = 0; i < n_vocab_; ++i) cur_[i] = llama_token_data{i, logits[i], 0.0f};
    }
    llama_token_data_array arr{cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(chain_, &arr);
    if (arr.selected < 0 || arr.selected >= static_cast<int64_t>(arr.size)) return kNoToken;
    return arr.data[arr.selected].id;
  }

  int32_t n_vocab_;
  bool greedy_ = false;
  std::vector<float> bias_;  // greedy only: dense logit bias, empty when none
  const VocabTrie* trie_;
  std::vector<llama_token_data> cur_;
  std::vector<Token> allowed_;
  llama_sampler* chain_ = nullptr;
  llama_sampler* grammar_ = nullptr;
};

}  // namespace

std::unique_ptr<Sampler> NewLlamaSampler(int32_t n_vocab, const SamplingParams& p, const llama_sampler* grammar,
                                         const VocabTrie* trie) {
  return std::make_unique<LlamaSampler>(n_vocab, p, grammar, trie);
}

}  // namespace kvb::engine
