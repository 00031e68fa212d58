#include "engine/scheduler.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>

#include "engine/scheduler_seq.h"

namespace kvb::engine {

namespace {

size_t CommonPrefix(const std::vector<Token>& a, const std::vector<Token>& b, size_t max_len) {
  size_t n = std::min({a.size(), b.size(), max_len});
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

}  // namespace

Scheduler::Scheduler(Backend* backend, SchedulerOptions options, ResultFn on_result, DeltaFn on_delta,
                     AdmitFn on_admit)
    : backend_(backend),
      options_(options),
      on_result_(std::move(on_result)),
      on_delta_(std::move(on_delta)),
      on_admit_(std::move(on_admit)) {
  int32_t n = backend_->n_seq_max();
  if (options_.monotonic_cells && n > 1) retired_seq_ = --n;
  options_.max_anchors = std::clamp(options_.max_anchors, 0, std::max(0, n - 1));
  max_running_ = n - options_.max_anchors;
  seqs_.resize(n);
  anchors_.resize(n);
  stats_.cells_total = backend_->n_cells();
}

Scheduler::~Scheduler() = default;

void Scheduler::Submit(Request request, bool urgent) {
  if (urgent) {
    waiting_.push_front(std::move(request));
  } else {
    waiting_.push_back(std::move(request));
  }
  stats_.waiting = static_cast<int32_t>(waiting_.size());
}

bool Scheduler::AnyRunning() const {
  return std::any_of(seqs_.begin(), seqs_.end(), [](const auto& s) { return s != nullptr; });
}

bool Scheduler::Idle() const {
  if (!waiting_.empty()) return false;
  for (const auto& s : seqs_)
    if (s) return false;
  for (const auto& a : anchors_)
    if (a && !a->ready) return false;
  return true;
}

int32_t Scheduler::MaxNew(const Request& r) const {
  int32_t room = backend_->n_ctx_seq() - static_cast<int32_t>(r.prompt.size());
  int32_t want = r.sampling.max_tokens > 0 ? r.sampling.max_tokens : room;
  return std::max(0, std::min(want, room));
}

// The longest prefix of r (at most max_len) shared with a waiting request
// in the lookahead, when it is at least `floor` tokens; else 0. Called on
// every admission, so most candidates are rejected by one token compare.
int32_t Scheduler::SharedWithWaiting(const Request& r, size_t max_len, size_t floor) const {
  if (floor == 0 || floor > max_len) return 0;
  size_t best = 0;
  size_t n = std::min(waiting_.size(), static_cast<size_t>(options_.lookahead) + 1);
  for (size_t i = 0; i < n; ++i) {
    const Request& w = waiting_[i];
    if (&w == &r || w.prompt.size() < floor || w.prompt[floor - 1] != r.prompt[floor - 1]) continue;
    best = std::max(best, CommonPrefix(r.prompt, w.prompt, max_len));
  }
  return best >= floor ? static_cast<int32_t>(best) : 0;
}

void Scheduler::Fail(Request& r, Status status) {
  Result res;
  res.id = r.id;
  res.status = std::move(status);
  res.prompt_tokens = static_cast<int32_t>(r.prompt.size());
  res.reply_parser = r.reply_parser;
  res.timing = TimingOf(r, 0, 0);
  ++stats_.requests_failed;
  on_result_(std::move(res));
}

// Returns true when `r` was consumed (admitted or failed), false when it must wait.
bool Scheduler::TryAdmit(Request& r) {
  const int32_t n = static_cast<int32_t>(r.prompt.size());
  if (n == 0) {
    Fail(r, Status::InvalidArgument("the prompt is empty"));
    return true;
  }
  const int32_t n_choices = std::max(1, r.n);
  if (n_choices > max_running_) {
    Fail(r, Status::InvalidArgument("n = " + std::to_string(n_choices) + " choices need as many parallel sequences; " +
                                    "this engine runs at most " + std::to_string(max_running_) +
                                    " (raise --max-seqs)"));
    return true;
  }
  if (n >= backend_->n_ctx_seq()) {
    Fail(r, Status::ResourceExhausted("the prompt has " + std::to_string(n) +
                                      " tokens; this model's context holds at most " +
                                      std::to_string(backend_->n_ctx_seq() - 1) +
                                      " prompt tokens (plus at least one to generate)"));
    return true;
  }
  // A suspect runs alone: no other request running. One whose steps failed
  // (failures_) also shares nothing with an anchor, whose state may be the cause.
  const bool suspect = Suspect(r);
  const bool fresh = FailedBefore(r);
  if (suspect && AnyRunning()) return false;
  // At least the last prompt token is always decoded by the request itself:
  // its logits give the first sampled token.
  const size_t max_len = static_cast<size_t>(n - 1);
  PrefixCache::Match m;
  if (!fresh) m = ForkableMatch(r, max_len);

  // An anchor being prefilled will serve more of this prompt: wait for it.
  for (const auto& a : anchors_) {
    if (fresh) break;
    if (a && !a->ready && static_cast<int32_t>(a->tokens.size()) > m.length && a->tokens.size() <= max_len &&
        CommonPrefix(a->tokens, r.prompt, max_len) == a->tokens.size())
      return false;
  }

  // A longer prefix shared with requests still waiting: decode it once into
  // an anchor, then fork this request and the others from it.
  const int32_t shared =
      fresh || anchors_disabled_
          ? 0
          : SharedWithWaiting(r, max_len, static_cast<size_t>(m.length + std::max(1, options_.min_anchor_gain)));
  if (shared > 0) {
    auto slot = FreeSlot(/*anchor=*/true);
    if (!slot) {
      if (auto victim = cache_.LruIdle(m.seq)) {
        EvictAnchor(*victim);
        slot = FreeSlot(true);
      }
    }
    const int32_t cells = shared - m.length;
    if (slot && MakeRoom(cells, m.seq)) {
      auto a = std::make_unique<Anchor>();
      a->id = *slot;
      a->tokens.assign(r.prompt.begin(), r.prompt.begin() + shared);
      a->n_past = m.length;
      a->reserved = cells;
      if (m.length > 0) {
        backend_->CopySeq(m.seq, a->id, m.length);
        cache_.Acquire(m.seq);
        a->parent = m.seq;
      }
      anchors_[a->id] = std::move(a);
      // The prefix is computed for this request: only what was resident
      // before counts as served from the cache.
      credit_[r.id] = m.length;
      return false;
    }
  }

  std::vector<int32_t> slots = FreeSlots(n_choices);
  if (static_cast<int32_t>(slots.size()) < n_choices) return false;
  const int32_t max_new = MaxNew(r);
  // The prompt's own cells once (choices share them), generated ones per choice.
  int32_t need = n - m.length + n_choices * max_new;
  if (!MakeRoom(need, m.seq)) {
    // The anchor it would fork from is all that is in the way (a request
    // wanting the whole context): with nothing else running, run it without
    // the anchor rather than never.
    if (m.length == 0 || AnyRunning()) return false;
    m = PrefixCache::Match{};
    need = n + n_choices * max_new;
    if (!MakeRoom(need, -1)) return false;
  }

  std::vector<std::unique_ptr<Sampler>> samplers;
  for (int32_t i = 0; i < n_choices; ++i) {
    SamplingParams params = r.sampling;
    params.seed = SamplerSeed(r.sampling.seed, r.prompt, i);
    // What this choice can really generate: the sampler sizes its state
    // (the penalty window) by it, never by an absurd max_tokens.
    params.max_tokens = std::max(1, max_new);
    samplers.push_back(backend_->NewSampler(params));
    if (!samplers.back()) {
      Fail(r, Status::InvalidArgument("the request's grammar does not parse"));
      return true;
    }
  }
  // A lone greedy choice whose logits nobody reads is picked on the device.
  const bool device_greedy =
      n_choices == 1 && samplers[0]->PlainGreedy() && !r.logprobs && r.capture_top_logits == 0;
  slots = PreferSlots(std::move(slots), device_greedy);
  for (int32_t slot : slots) backend_->SetDeviceGreedy(slot, device_greedy);
  admitted_.push_back(r.id);
  if (r.test_abort) {
    std::fprintf(stderr, "kvbatch: KVBATCH_TEST_CRASH_ON: aborting on request %llu once admitted (test hook)\n",
                 static_cast<unsigned long long>(r.id));
    abort_admitted_ = true;
  }
  auto g = std::make_shared<Group>();
  g->admitted_ns = SteadyNowNs();
  auto c = credit_.find(r.id);
  g->cached = c != credit_.end() ? std::min(c->second, m.length) : m.length;
  if (c != credit_.end()) credit_.erase(c);
  std::vector<size_t> streamed(n_choices, 0);
  if (auto st = streamed_.find(r.id); st != streamed_.end()) {
    streamed = st->second;
    streamed.resize(n_choices, 0);
    streamed_.erase(st);
  }
  g->req = std::move(r);
  g->seqs = slots;
  g->choices.resize(n_choices);
  g->live = n_choices;
  const int64_t order = admit_order_++;
  for (int32_t i = 0; i < n_choices; ++i) {
    auto s = std::make_unique<Seq>();
    s->group = g;
    s->choice = i;
    s->id = slots[i];
    s->order = order;
    s->max_new = max_new;
    s->sampler = std::move(samplers[i]);
    s->streamed = streamed[i];
    if (i == 0) {
      s->n_past = m.length;
      s->forked = m.length;
      s->reserved = n - m.length + max_new;
      if (m.length > 0) {
        backend_->CopySeq(m.seq, s->id, m.length);
        cache_.Acquire(m.seq);
        s->anchor = m.seq;
      }
    } else {
      s->awaiting_fork = true;
      s->reserved = max_new;
    }
    seqs_[s->id] = std::move(s);
  }
  return true;
}

void Scheduler::Admit() {
  // Nothing joins a suspect: it runs alone.
  for (const auto& s : seqs_)
    if (s && Suspect(s->req())) return;
  while (!waiting_.empty()) {
    short_of_cells_ = false;
    if (DrainBeforeWave(waiting_.front())) continue;
    if (!TryAdmit(waiting_.front())) {
      if (short_of_cells_ && DrainCells()) continue;
      break;
    }
    waiting_.pop_front();
  }
  if (admitted_.empty()) return;
  if (on_admit_) on_admit_(admitted_);
  admitted_.clear();
  if (abort_admitted_) std::abort();  // as a crash inside llama.cpp would, after the record
}

void Scheduler::Release(Seq& s) {
  Retire(s.id, s.n_past, s.n_past - s.forked);
  if (s.anchor >= 0) cache_.Release(s.anchor);
  seqs_[s.id].reset();  // destroys s
}

// Releases every sequence of a group; returns its request. The caller
// holds a shared_ptr to the group (its sequences' references go away here).
Request Scheduler::ReleaseGroup(Group& g) {
  Request r = std::move(g.req);
  for (int32_t id : g.seqs)
    if (seqs_[id] && seqs_[id]->group.get() == &g) Release(*seqs_[id]);
  return r;
}

// Pushes a running request (all its choices) back to the front of the
// queue; it restarts from scratch, with the same seeds, so its result does
// not change.
void Scheduler::Requeue(Seq& s) {
  ++stats_.requeued;
  std::shared_ptr<Group> g = s.group;
  credit_[g->req.id] = g->cached;
  std::vector<size_t> streamed(g->seqs.size(), 0);
  bool any = false;
  for (size_t i = 0; i < g->seqs.size(); ++i) {
    const auto& q = seqs_[g->seqs[i]];
    if (q && q->group == g) streamed[i] = q->streamed, any = any || q->streamed > 0;
  }
  if (any) streamed_[g->req.id] = std::move(streamed);
  waiting_.push_front(ReleaseGroup(*g));
}

// A step failed for a reason other than a full cache (llama_decode -1, an
// exception): which request caused it is unknown. Every request in it is
// requeued as a suspect (it then runs alone) until it has failed
// max_attempts steps; then it fails with the error, logged once. Unfinished
// anchors are dropped; anchors that keep failing on their own are turned
// off. Nothing is retried without bound.
void Scheduler::StepFailed(const Status& st) {
  ++stats_.failed_steps;
  std::vector<std::shared_ptr<Group>> groups;
  for (auto& s : seqs_)
    if (s && std::find(groups.begin(), groups.end(), s->group) == groups.end())
      groups.push_back(s->group);
  for (auto& a : anchors_)
    if (a) a->chunk = 0;
  for (auto& a : anchors_)
    if (a && !a->ready && cache_.Refs(a->id) == 0) EvictAnchor(a->id);
  if (groups.empty() && ++anchor_failures_ >= options_.max_attempts && !anchors_disabled_) {
    anchors_disabled_ = true;
    std::fprintf(stderr, "kvbatch: shared-prefix anchors failed %d times (%s); continuing without them\n",
                 anchor_failures_, st.message().c_str());
  }
  for (auto& g : groups) {
    Seq* leader = seqs_[g->seqs[0]].get();
    if (leader == nullptr || leader->group != g) {
      for (int32_t id : g->seqs)
        if (seqs_[id] && seqs_[id]->group == g) leader = seqs_[id].get();
    }
    const uint64_t id = g->req.id;
    const int32_t failures = ++failures_[id];
    if (failures < options_.max_attempts) {
      Requeue(*leader);
      continue;
    }
    failures_.erase(id);
    credit_.erase(id);
    streamed_.erase(id);
    Request r = ReleaseGroup(*g);
    std::fprintf(stderr, "kvbatch: request %llu failed %d times in the engine, alone at the end; giving up: %s\n",
                 static_cast<unsigned long long>(id), failures, st.message().c_str());
    Fail(r, Status(st.code() == StatusCode::kOk ? StatusCode::kInternal : st.code(),
                   "the engine failed on this request " + std::to_string(failures) + " times (" + st.message() +
                       "); it was not retried further"));
  }
}

void Scheduler::RecoverFromException(const std::string& what) {
  StepFailed(Status::Internal("exception in the engine step: " + what));
}

void Scheduler::FailGroup(Seq& s, Status status) {
  std::shared_ptr<Group> g = s.group;
  failures_.erase(g->req.id);
  Request r = ReleaseGroup(*g);
  Fail(r, std::move(status));
}

void Scheduler::Cancel(uint64_t id) {
  auto w = std::find_if(waiting_.begin(), waiting_.end(), [id](const Request& r) { return r.id == id; });
  if (w != waiting_.end()) {
    Request r = std::move(*w);
    waiting_.erase(w);
    failures_.erase(id);
    credit_.erase(id);
    streamed_.erase(id);
    Fail(r, Status::Cancelled("the request was cancelled"));
    return;
  }
  for (auto& slot : seqs_) {
    if (!slot || slot->req().id != id) continue;
    std::shared_ptr<Group> g = slot->group;
    Request r = ReleaseGroup(*g);
    Fail(r, Status::Cancelled("the request was cancelled"));
    return;
  }
}

bool Scheduler::Step() {
  Admit();
  std::vector<BatchToken> batch;
  const int32_t n_batch = backend_->n_batch();

  // One token for every decoding sequence first: decoding never stalls
  // behind a long prompt.
  for (auto& s : seqs_) {
    if (!s) continue;
    s->batch_index = -1;
    s->chunk = 0;
    if (!s->decoding()) continue;
    s->batch_index = static_cast<int32_t>(batch.size());
    batch.push_back({s->out.back(), s->n_past, s->id, true});
  }
  // Then prompt chunks up to the token budget: anchors first (requests wait
  // on them), then requests in admission order.
  int32_t budget = n_batch - static_cast<int32_t>(batch.size());
  for (auto& a : anchors_) {
    if (!a || a->ready) continue;
    a->chunk = std::min(budget, static_cast<int32_t>(a->tokens.size()) - a->n_past);
    for (int32_t i = 0; i < a->chunk; ++i)
      batch.push_back({a->tokens[a->n_past + i], a->n_past + i, a->id, false});
    budget -= a->chunk;
  }
  std::vector<Seq*> prefill;
  for (auto& s : seqs_)
    if (s && s->prefilling()) prefill.push_back(s.get());
  std::sort(prefill.begin(), prefill.end(), [](Seq* a, Seq* b) { return a->order < b->order; });
  for (Seq* s : prefill) {
    const std::vector<Token>& prompt = s->req().prompt;
    const int32_t n = static_cast<int32_t>(prompt.size());
    s->chunk = std::min(budget, n - s->n_past);
    for (int32_t i = 0; i < s->chunk; ++i) {
      const int32_t pos = s->n_past + i;
      const bool last = pos == n - 1;
      if (last) s->batch_index = static_cast<int32_t>(batch.size());
      batch.push_back({prompt[pos], pos, s->id, last});
    }
    budget -= s->chunk;
  }

  if (batch.empty()) {
    // Nothing runs and the head of the queue cannot be admitted: it can
    // never fit (admission guarantees this does not happen; fail loudly).
    if (!waiting_.empty()) {
      Request r = std::move(waiting_.front());
      waiting_.pop_front();
      Fail(r, Status::ResourceExhausted("the request does not fit in the KV cache"));
      return true;
    }
    return false;
  }

  const int64_t decode_start = SteadyNowNs();
  Status st = backend_->Decode(batch);
  last_step_ = {};
  last_step_.decode_seconds = static_cast<double>(SteadyNowNs() - decode_start) * 1e-9;
  stats_.decode_seconds += last_step_.decode_seconds;
  last_step_.tokens = static_cast<int32_t>(batch.size());
  last_step_.ok = st.ok();
  ++stats_.steps;
  if (!st.ok()) {
    // Admission should prevent this; if the cache is full anyway, push the
    // newest sequence back and retry (never abort the run).
    Seq* newest = nullptr;
    for (auto& s : seqs_)
      if (s && (!newest || s->order > newest->order)) newest = s.get();
    for (auto& a : anchors_)
      if (a) a->chunk = 0;
    if (newest && st.code() == StatusCode::kResourceExhausted) {
      Requeue(*newest);
      return true;
    }
    StepFailed(st);
    return true;
  }
  anchor_failures_ = 0;

  for (auto& a : anchors_) {
    if (!a || a->ready || a->chunk == 0) continue;
    a->n_past += a->chunk;
    stats_.prefill_tokens += a->chunk;
    if (a->n_past == static_cast<int32_t>(a->tokens.size())) {
      a->ready = true;
      cache_.Insert(a->id, a->tokens);
    }
  }
  const int32_t n_vocab = backend_->n_vocab();
  for (auto& slot : seqs_) {
    if (!slot) continue;
    Seq& s = *slot;
    if (s.chunk > 0) {
      s.n_past += s.chunk;
      stats_.prefill_tokens += s.chunk;
    } else if (s.batch_index >= 0) {
      s.n_past += 1;  // the decoded token is now resident
    }
    if (s.batch_index < 0) continue;
    ++last_step_.sequences;
    if (backend_->DeviceGreedy(s.id)) {
      if (const Token t = backend_->DeviceToken(s.batch_index); t != kNoToken) {
        ++stats_.device_picks;
        Take(s, t, nullptr);
        continue;
      }
    }
    const float* logits = backend_->Logits(s.batch_index);
    const bool first = s.out.empty() && s.chunk > 0;  // logits after the prompt
    if (first && s.req().capture_top_logits > 0) {
      std::vector<int32_t> idx(n_vocab);
      std::iota(idx.begin(), idx.end(), 0);
      const int32_t k = std::min(s.req().capture_top_logits, n_vocab);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                        [logits](int32_t a, int32_t b) { return logits[a] > logits[b]; });
      for (int32_t i = 0; i < k; ++i) s.group->top_logits.emplace_back(idx[i], logits[idx[i]]);
    }
    // Siblings first: the leader may finish (and with the last choice,
    // release the group) on its own first token. A sibling's failing
    // sampler releases the whole group, `s` included: only `id` is read after.
    const int32_t id = s.id;
    if (first && s.group->seqs.size() > 1) Fork(s, logits);
    if (seqs_[id].get() == &s && !s.done) Sample(s, logits);
  }

  stats_.waiting = static_cast<int32_t>(waiting_.size());
  stats_.active = 0;
  stats_.anchors = 0;
  stats_.cells_used = 0;
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (seqs_[i]) {
      ++stats_.active;
      stats_.cells_used += seqs_[i]->n_past - seqs_[i]->forked;
    }
    if (anchors_[i]) {
      ++stats_.anchors;
      const int32_t fork = static_cast<int32_t>(anchors_[i]->tokens.size()) - anchors_[i]->reserved;
      stats_.cells_used += anchors_[i]->n_past - fork;
    }
  }
  stats_.cells_reserved = backend_->n_cells() - options_.reserve_cells - FreeCells();
  stats_.cells_peak = std::max(stats_.cells_peak, stats_.cells_used);
  return true;
}

}  // namespace kvb::engine
