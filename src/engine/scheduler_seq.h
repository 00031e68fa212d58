// The scheduler's per-request and per-sequence state, shared by
// scheduler.cc (admission, steps) and scheduler_output.cc (sampling,
// streaming, finishing). Private to the engine.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/scheduler.h"
#include "engine/types.h"

namespace kvb::engine {

// One admitted request: its n choices run as n sequences. Choice 0 (the
// leader) prefills the prompt; the others wait and then fork its cells.
// Every sequence of a group is released together when the last choice
// finishes, so the prompt cells (owned by the leader's reservation) stay
// while any choice still attends to them.
struct Scheduler::Group {
  Request req;
  std::vector<int32_t> seqs;    // sequence id of each choice
  std::vector<Choice> choices;  // finished choices, by index
  int32_t live = 0;             // choices still generating
  int32_t cached = 0;           // prompt tokens credited as served from a shared prefix
  std::vector<std::pair<Token, float>> top_logits;
  int64_t admitted_ns = 0;     // steady clock (Result::timing)
  int64_t first_token_ns = 0;  // 0: no token generated yet
};

struct Scheduler::Seq {
  std::shared_ptr<Group> group;
  int32_t choice = 0;
  int32_t id = -1;
  int64_t order = 0;      // admission order: the newest is requeued first
  int32_t n_past = 0;     // positions resident in this sequence
  int32_t forked = 0;     // positions shared with the anchor or leader (cells it does not own)
  int32_t anchor = -1;    // the anchor this sequence was forked from (holds a ref)
  int32_t reserved = 0;   // worst-case cells this sequence may add
  int32_t max_new = 0;
  int32_t batch_index = -1;
  int32_t chunk = 0;      // prompt tokens in the current batch
  bool awaiting_fork = false;  // choice > 0 whose leader has not finished the prompt
  bool done = false;           // this choice finished; its siblings have not
  std::unique_ptr<Sampler> sampler;
  std::vector<Token> out;
  std::string text;
  size_t streamed = 0;  // bytes of text already sent to on_delta
  FinishReason finish = FinishReason::kStop;
  std::vector<TokenLogprob> logprobs;

  const Request& req() const { return group->req; }
  bool prefilling() const { return !awaiting_fork && n_past < static_cast<int32_t>(req().prompt.size()); }
  bool decoding() const { return !awaiting_fork && !done && !prefilling(); }
};

struct Scheduler::Anchor {
  int32_t id = -1;
  std::vector<Token> tokens;
  int32_t n_past = 0;
  int32_t parent = -1;   // anchor it was forked from (holds a ref)
  int32_t reserved = 0;  // cells it owns: tokens beyond the fork
  int32_t chunk = 0;
  bool ready = false;
};

// A Result's timings from its request's submission (0 = not recorded).
inline Result::Timing TimingOf(const Request& r, int64_t admitted_ns, int64_t first_token_ns) {
  Result::Timing t;
  if (r.submitted_ns == 0) return t;
  auto since = [&](int64_t ns) { return static_cast<double>(ns - r.submitted_ns) * 1e-9; };
  if (admitted_ns != 0) t.queued = since(admitted_ns);
  if (first_token_ns != 0) t.first_token = since(first_token_ns);
  t.total = since(SteadyNowNs());
  return t;
}

}  // namespace kvb::engine
