// The output side of the scheduler: sampling a choice's next token,
// forking the other choices after the prompt, stop strings, streaming and
// finishing (a request's Result is emitted when its last choice finishes).
#include <algorithm>
#include <exception>

#include "engine/logprobs.h"
#include "engine/scheduler.h"
#include "engine/scheduler_seq.h"

namespace kvb::engine {

// A choice is finished: keep its output; the last one of the group emits
// the Result and releases every sequence of the group.
void Scheduler::FinishChoice(Seq& s) {
  Stream(s, true);
  Group& g = *s.group;
  Choice& c = g.choices[s.choice];
  c.text = std::move(s.text);
  c.tokens = std::move(s.out);
  c.finish = s.finish;
  c.logprobs = std::move(s.logprobs);
  s.done = true;
  if (--g.live > 0) return;

  std::shared_ptr<Group> keep = s.group;
  Result res;
  res.id = g.req.id;
  res.prompt_tokens = static_cast<int32_t>(g.req.prompt.size());
  res.cached_tokens = g.cached;
  res.logprobs = g.req.logprobs;
  res.reply_parser = g.req.reply_parser;
  res.top_logits = std::move(g.top_logits);
  for (const Choice& ch : g.choices) res.completion_tokens += static_cast<int32_t>(ch.tokens.size());
  res.choices = std::move(g.choices);
  res.text = res.choices[0].text;
  res.tokens = res.choices[0].tokens;
  res.finish = res.choices[0].finish;
  res.timing = TimingOf(g.req, g.admitted_ns, g.first_token_ns);
  ++stats_.requests_done;
  failures_.erase(res.id);
  stats_.prompt_tokens += res.prompt_tokens;
  stats_.cached_tokens += res.cached_tokens;
  stats_.completion_tokens += res.completion_tokens;
  ReleaseGroup(g);
  on_result_(std::move(res));
}

// Sends the part of a streaming request's text that can no longer change.
void Scheduler::Stream(Seq& s, bool final) {
  if (!s.req().stream || !on_delta_) return;
  size_t end = s.text.size();
  if (!final) {
    size_t hold = 0;  // a stop string may still complete over the next tokens
    for (const std::string& stop : s.req().sampling.stop) hold = std::max(hold, stop.empty() ? 0 : stop.size() - 1);
    end = end > hold ? end - hold : 0;
    // Never split a UTF-8 character: back up to the start of the last one
    // and keep it unless all its bytes are there.
    size_t start = end;
    while (start > 0 && (static_cast<unsigned char>(s.text[start - 1]) & 0xC0) == 0x80 && end - start < 3) --start;
    if (start > 0) {
      const auto lead = static_cast<unsigned char>(s.text[start - 1]);
      const size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
      if (need > 1 && end - (start - 1) < need) end = start - 1;
    }
  }
  if (end <= s.streamed) return;
  on_delta_(s.req().id, s.choice, std::string_view(s.text).substr(s.streamed, end - s.streamed));
  s.streamed = end;
}

// Appends a sampled token; returns true when the choice is finished.
bool Scheduler::Accept(Seq& s, Token t) {
  if (t == kNoToken) {
    // The grammar allows nothing more: the answer is incomplete.
    s.finish = FinishReason::kLength;
    return true;
  }
  if (backend_->IsEndOfGeneration(t)) {
    s.finish = FinishReason::kStop;
    return true;
  }
  s.out.push_back(t);
  ++stats_.generated_tokens;
  if (s.group->first_token_ns == 0) s.group->first_token_ns = SteadyNowNs();
  const size_t before = s.text.size();
  const auto& keep = s.req().sampling.preserved_tokens;
  s.text += std::binary_search(keep.begin(), keep.end(), t) ? backend_->SpecialPiece(t) : backend_->Piece(t);
  // The earliest match of any stop string, not the first string listed
  // that matches: the text is cut before every stop string.
  size_t cut = std::string::npos;
  for (const std::string& stop : s.req().sampling.stop) {
    if (stop.empty()) continue;
    size_t from = before >= stop.size() ? before - stop.size() + 1 : 0;
    cut = std::min(cut, s.text.find(stop, from));
  }
  if (cut != std::string::npos) {
    s.text.resize(cut);
    s.finish = FinishReason::kStop;
    return true;
  }
  if (static_cast<int32_t>(s.out.size()) >= s.max_new) {
    s.finish = FinishReason::kLength;
    return true;
  }
  return false;
}

// Samples the next token of a choice from its logits and accepts it.
void Scheduler::Sample(Seq& s, const float* logits) {
  Token t = kNoToken;
  try {
    t = s.sampler->Sample(logits);
  } catch (const std::exception& e) {
    // llama.cpp's grammar throws when its state breaks: this request fails, alone.
    FailGroup(s, Status::Internal(std::string("sampling failed: ") + e.what()));
    return;
  }
  Take(s, t, logits);
}

// Accepts a choice's next token (sampled here or picked on the device, when
// `logits` is null) and finishes or streams the choice.
void Scheduler::Take(Seq& s, Token t, const float* logits) {
  const Request& r = s.req();
  if (r.logprobs && logits && t != kNoToken && !backend_->IsEndOfGeneration(t))
    s.logprobs.push_back(ComputeLogprobs(logits, backend_->n_vocab(), t, r.top_logprobs, *backend_));
  if (s.max_new == 0 || Accept(s, t)) {
    FinishChoice(s);
  } else {
    Stream(s, false);
  }
}

// The leader has just decoded its last prompt token: the other choices
// share its prompt cells (no copy) and sample their first token from the
// same logits.
void Scheduler::Fork(Seq& leader, const float* logits) {
  // Held: a sampler that throws fails the group (FailGroup) while this
  // loop still walks it.
  const std::shared_ptr<Group> keep = leader.group;
  const Group& g = *keep;
  const int32_t n = static_cast<int32_t>(g.req.prompt.size());
  for (size_t i = 1; i < g.seqs.size(); ++i) {
    Seq* f = seqs_[g.seqs[i]].get();
    if (!f || !f->awaiting_fork) continue;
    backend_->CopySeq(leader.id, f->id, n);
    f->awaiting_fork = false;
    f->n_past = n;
    f->forked = n;
  }
  for (size_t i = 1; i < g.seqs.size(); ++i) {
    Seq* f = seqs_[g.seqs[i]].get();
    if (f && f->group.get() == &g && !f->done && f->out.empty()) Sample(*f, logits);
  }
}

}  // namespace kvb::engine
