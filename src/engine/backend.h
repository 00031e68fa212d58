// The seam between scheduling and llama.cpp. The scheduler decides what runs;
// a Backend owns the context and does it. Tests drive the scheduler with a
// fake Backend; LlamaBackend is the real one.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/types.h"

namespace kvb::engine {

struct BatchToken {
  Token token;
  int32_t pos;
  int32_t seq;
  bool logits;  // this token's next-token logits are needed
};

// Sample() when a grammar allows no token at all (the answer cannot be
// completed; the scheduler reports it as cut, finish_reason "length").
inline constexpr Token kNoToken = -1;

// A request's sampler: owns its RNG, penalty history and grammar state.
class Sampler {
 public:
  virtual ~Sampler() = default;
  // Picks the next token from the logits (read-only; not modified by the
  // caller later) and advances the sampler's state with it; or kNoToken.
  virtual Token Sample(const float* logits) = 0;
  // Whether the pick is the plain argmax of the logits (temperature 0, no
  // bias, penalties or grammar) and the sampler keeps no state: the device
  // may then pick it (Backend::SetDeviceGreedy) and the caller skips Sample.
  virtual bool PlainGreedy() const { return false; }
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual int32_t n_seq_max() const = 0;  // sequence ids [0, n_seq_max)
  virtual int32_t n_cells() const = 0;    // KV cells in the unified cache
  virtual int32_t n_ctx_seq() const = 0;  // positions one sequence may use
  virtual int32_t n_batch() const = 0;    // tokens one Decode may take
  virtual int32_t n_vocab() const = 0;

  // Shares the cells of positions [0, n) of `src` with `dst` (no copy).
  virtual void CopySeq(int32_t src, int32_t dst, int32_t n) = 0;
  // Whether CopySeq may take a prefix shorter than what `src` holds. False
  // for recurrent and hybrid memory: a recurrent state exists only at the
  // end of what a sequence has decoded, so forks happen only there.
  virtual bool PartialForks() const { return true; }
  virtual void RemoveSeq(int32_t seq) = 0;

  // Decodes the batch. kResourceExhausted: no room in the KV cache; any
  // other error is a failed step (the scheduler retries its requests in
  // isolation, a bounded number of times).
  virtual Status Decode(const std::vector<BatchToken>& batch) = 0;
  // Logits of the i-th token of the last Decode (which must have asked for
  // them), unless DeviceToken gave that token's pick.
  virtual const float* Logits(int32_t batch_index) = 0;
  // Device sampling: `seq`'s next tokens are picked by argmax where the
  // logits are computed (llama.cpp's backend sampling), so they need not be
  // copied back to the host when every output of a step is picked so. The
  // scheduler sets it when a request takes the sequence id. A backend that
  // cannot ignores it and DeviceToken returns kNoToken.
  virtual void SetDeviceGreedy(int32_t /*seq*/, bool /*on*/) {}
  // Whether `seq` is device-greedy now (what SetDeviceGreedy last set).
  virtual bool DeviceGreedy(int32_t /*seq*/) const { return false; }
  // The device's pick for the i-th token of the last Decode, or kNoToken
  // (its sequence is not device-greedy: read Logits).
  virtual Token DeviceToken(int32_t /*batch_index*/) { return kNoToken; }

  // Null when params.grammar does not parse (callers validate grammars
  // first, see engine::CheckGrammar; the request then fails, never aborts).
  virtual std::unique_ptr<Sampler> NewSampler(const SamplingParams& params) = 0;
  virtual bool IsEndOfGeneration(Token t) const = 0;
  virtual std::string Piece(Token t) const = 0;
  // A special token's own text (<tool_call>, ...), for SamplingParams::preserved_tokens.
  virtual std::string SpecialPiece(Token t) const { return Piece(t); }
};

}  // namespace kvb::engine
