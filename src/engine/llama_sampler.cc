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

// Incremental UTF-8 validation (RFC 3629: no overlongs, surrogates or code
// points past U+10FFFF). llama.cpp's grammar decodes bytes more leniently,
// so with a grammar the sampler also keeps the output valid UTF-8: JSON text
// must be, and an invalid byte would become U+FFFD in the response (one more
// character than the grammar counted against a maxLength).
struct Utf8State {
  uint8_t need = 0;  // continuation bytes still expected
  uint8_t lo = 0x80, hi = 0xBF;  // range of the next continuation byte

  bool Step(uint8_t c) {
    if (need > 0) {
      if (c < lo || c > hi) return false;
      --need, lo = 0x80, hi = 0xBF;
      return true;
    }
    if (c < 0x80) return true;
    if (c >= 0xC2 && c <= 0xDF) return need = 1, true;
    if (c == 0xE0) return need = 2, lo = 0xA0, true;
    if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return need = 2, true;
    if (c == 0xED) return need = 2, hi = 0x9F, true;
    if (c == 0xF0) return need = 3, lo = 0x90, true;
    if (c >= 0xF1 && c <= 0xF3) return need = 3, true;
    if (c == 0xF4) return need = 3, hi = 0x8F, true;
    return false;
  }
  // Whether `piece` may follow; *next = the state after it.
  bool Accepts(const std::string& piece, Utf8State* next) const {
    Utf8State s = *this;
    for (char c : piece)
      if (!s.Step(static_cast<uint8_t>(c))) return false;
    *next = s;
    return true;
  }
};

// Windows of candidates examined, best first, when the grammar rejects a
// greedy pick (see ConstrainedArgmax).
constexpr size_t kGreedyWindows[] = {64};

// Greedy (temperature 0, no penalties) or llama.cpp's chain: logit bias,
// penalties, top-k, top-p, min-p, temperature, then a draw from the
// request's own counter-based RNG (GumbelPick). With a grammar: the unconstrained pick is checked
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
      // The window covers every generated token; the scheduler passes the
      // tokens this request can really generate, and the cap keeps a direct
      // caller's max_tokens from sizing it.
      const int32_t last_n = std::clamp(p.max_tokens > 0 ? p.max_tokens : 4096, 1, 1 << 17);
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
    seed_ = p.seed;
    draw_ = true;  // the draw itself is ours (GumbelPick), not llama.cpp's dist
  }
  ~LlamaSampler() override {
    if (chain_) llama_sampler_free(chain_);
    if (grammar_) llama_sampler_free(grammar_);
  }

  bool PlainGreedy() const override { return greedy_ && bias_.empty() && !grammar_; }

  Token Sample(const float* logits) override {
    Token t = greedy_ ? Argmax(logits) : Draw(logits, false);
    if (grammar_ && !Allowed(t)) t = greedy_ ? ConstrainedArgmax(logits) : Draw(logits, true);
    ++step_;
    if (t == kNoToken) return t;
    if (grammar_) llama_sampler_accept(grammar_, t);
    if (grammar_ && trie_) utf8_.Accepts(trie_->Piece(t), &utf8_);
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

  // Whether `t` keeps the output valid UTF-8 (see Utf8State).
  bool Utf8Ok(Token t) const {
    Utf8State next;
    return !trie_ || utf8_.Accepts(trie_->Piece(t), &next);
  }

  // Whether the grammar accepts token t next (a one-candidate apply).
  bool Allowed(Token t) {
    if (!Utf8Ok(t)) return false;
    llama_token_data d{t, 0.0f, 0.0f};
    llama_token_data_array one{&d, 1, -1, false};
    llama_sampler_apply(grammar_, &one);
    return !Rejected(d);
  }

  // The best token the grammar allows, or kNoToken. The best 64, then the
  // next 960 candidates are checked first: if any of a window is allowed,
  // the best of them is the constrained argmax (every token outside scores
  // lower). Only when both fail (a random model, a string at its maxLength)
  // is the allowed set computed.
  Token ConstrainedArgmax(const float* logits) {
    cur_.resize(n_vocab_);
    for (int32_t i = 0; i < n_vocab_; ++i) cur_[i] = {i, Biased(logits, i), 0.0f};
    auto better = [](const llama_token_data& a, const llama_token_data& b) {
      return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    };
    size_t from = 0;
    for (size_t window : kGreedyWindows) {
      const size_t to = std::min(window, cur_.size());
      if (to <= from) break;
      std::nth_element(cur_.begin() + from, cur_.begin() + to - 1, cur_.end(), better);
      llama_token_data_array arr{cur_.data() + from, to - from, -1, false};
      llama_sampler_apply(grammar_, &arr);
      const llama_token_data* best = nullptr;
      for (size_t i = from; i < to; ++i)
        if (!Rejected(cur_[i]) && (!best || better(cur_[i], *best)) && Utf8Ok(cur_[i].id)) best = &cur_[i];
      if (best) return best->id;
      from = to;
    }
    AllowedTokens();
    Token best = kNoToken;
    float best_v = -std::numeric_limits<float>::infinity();
    for (Token t : allowed_)
      if (const float v = Biased(logits, t); best == kNoToken || v > best_v || (v == best_v && t < best)) best_v = v, best = t;
    return best;
  }

  // allowed_ = every token the grammar allows next.
  void AllowedTokens() {
    allowed_.clear();
    if (trie_) {
      trie_->Allowed(grammar_, &allowed_);
      std::erase_if(allowed_, [this](Token t) { return !Utf8Ok(t); });
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
    if (draw_) return GumbelPick(arr, constrained ? 1 : 0);
    if (arr.selected < 0 || arr.selected >= static_cast<int64_t>(arr.size)) return kNoToken;
    return arr.data[arr.selected].id;
  }

  // A draw from softmax(logits) by the Gumbel-max trick: the argmax of
  // logit + G, with G ~ Gumbel(0,1) from a hash of (seed, step, ...).
  // Exactly distributed like the softmax, and robust where inverse-CDF
  // sampling is not: float noise in the logits (batch shapes change
  // llama.cpp's reductions) flips the pick only when the two best perturbed
  // values are that close (an O(1) gap), not whenever the uniform draw lands
  // near a boundary of the cumulative sum (an O(p) gap: thousands of
  // near-equal tiny probabilities in a flat distribution). Two levels keep
  // it cheap (one exp per candidate, two logs per block of 64 ids): the max
  // of a block's perturbed logits is Gumbel(logsumexp of the block) and
  // its argmax is an independent softmax draw within the block, so a block
  // is drawn first, then a token in it. `salt` makes the grammar's redraw
  // independent of the rejected draw (which keeps sample-then-check exact).
  Token GumbelPick(const llama_token_data_array& arr, uint64_t salt) {
    // Blocks by token id, not by position: the chain's top-k / top-p leave
    // candidates in an order that itself depends on float noise.
    constexpr int32_t kBlockShift = 6;  // 64 ids per block
    const uint64_t key = Mix(seed_ + 0x9e3779b97f4a7c15ull * (step_ + 1) + salt);
    float max = -std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < arr.size; ++i) max = std::max(max, arr.data[i].logit);
    if (!std::isfinite(max)) return kNoToken;
    block_sum_.assign((static_cast<size_t>(n_vocab_) >> kBlockShift) + 1, 0.0f);
    for (size_t i = 0; i < arr.size; ++i)
      block_sum_[static_cast<size_t>(arr.data[i].id) >> kBlockShift] += std::exp(arr.data[i].logit - max);
    size_t best_block = block_sum_.size();
    double best_v = -std::numeric_limits<double>::infinity();
    for (size_t b = 0; b < block_sum_.size(); ++b) {
      if (!(block_sum_[b] > 0.0f)) continue;
      const double v = std::log(static_cast<double>(block_sum_[b])) + Gumbel(Mix(key ^ (b * 0xd6e8feb86659fd93ull)));
      if (v > best_v) best_v = v, best_block = b;
    }
    if (best_block == block_sum_.size()) return kNoToken;
    Token best = kNoToken;
    best_v = -std::numeric_limits<double>::infinity();
    const uint64_t token_key = Mix(key ^ 0xa0761d6478bd642full);
    for (size_t i = 0; i < arr.size; ++i) {
      const llama_token_data& d = arr.data[i];
      if ((static_cast<size_t>(d.id) >> kBlockShift) != best_block || !std::isfinite(d.logit)) continue;
      const double v = d.logit + Gumbel(Mix(token_key ^ (static_cast<uint64_t>(d.id) * 0xd1b54a32d192ed03ull)));
      if (v > best_v || (v == best_v && d.id < best)) best_v = v, best = d.id;
    }
    return best;
  }

  static double Gumbel(uint64_t h) {
    const double u = (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53;  // (0, 1)
    return -std::log(-std::log(u));
  }

  static uint64_t Mix(uint64_t z) {  // SplitMix64's finalizer
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  int32_t n_vocab_;
  bool greedy_ = false;
  bool draw_ = false;    // temperature > 0: GumbelPick after the chain
  uint64_t seed_ = 0;
  uint64_t step_ = 0;    // tokens sampled so far: the draw's counter
  std::vector<float> bias_;  // greedy only: dense logit bias, empty when none
  const VocabTrie* trie_;
  std::vector<llama_token_data> cur_;
  std::vector<Token> allowed_;
  std::vector<float> block_sum_;  // GumbelPick's per-block sums
  Utf8State utf8_;                // of the output so far (with a grammar)
  llama_sampler* chain_ = nullptr;
  llama_sampler* grammar_ = nullptr;
};

}  // namespace

std::unique_ptr<Sampler> NewLlamaSampler(int32_t n_vocab, const SamplingParams& p, const llama_sampler* grammar,
                                         const VocabTrie* trie) {
  return std::make_unique<LlamaSampler>(n_vocab, p, grammar, trie);
}

}  // namespace kvb::engine
