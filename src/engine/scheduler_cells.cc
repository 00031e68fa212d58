// The scheduler's bookkeeping of sequence ids and KV cells: what is free,
// making room by evicting idle anchors, and (deterministic mode) retiring
// finished sequences' cells until the cache is drained.
#include <algorithm>
#include <cassert>

#include "engine/scheduler.h"
#include "engine/scheduler_seq.h"

namespace kvb::engine {

int32_t Scheduler::FreeCells() const {
  int32_t used = 0;
  for (const auto& s : seqs_)
    if (s) used += s->reserved;
  for (const auto& a : anchors_)
    if (a) used += a->reserved;
  return backend_->n_cells() - options_.reserve_cells - used - retired_cells_;
}

std::optional<int32_t> Scheduler::FreeSlot(bool anchor) const {
  int32_t running = 0, anchors = 0;
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (seqs_[i]) ++running;
    if (anchors_[i]) ++anchors;
  }
  if (anchor ? anchors >= options_.max_anchors : running >= max_running_) return std::nullopt;
  for (size_t i = 0; i < seqs_.size(); ++i)
    if (!seqs_[i] && !anchors_[i]) return static_cast<int32_t>(i);
  return std::nullopt;
}

// n free sequence ids for a request's choices, or fewer when they are not there.
std::vector<int32_t> Scheduler::FreeSlots(int32_t n) const {
  int32_t running = 0;
  for (const auto& s : seqs_) running += s != nullptr;
  std::vector<int32_t> out;
  if (running + n > max_running_) return out;
  for (size_t i = 0; i < seqs_.size() && static_cast<int32_t>(out.size()) < n; ++i)
    if (!seqs_[i] && !anchors_[i]) out.push_back(static_cast<int32_t>(i));
  return out;
}

std::vector<int32_t> Scheduler::PreferSlots(std::vector<int32_t> slots, bool device) const {
  std::vector<int32_t> same;
  for (size_t i = 0; i < seqs_.size() && same.size() < slots.size(); ++i)
    if (!seqs_[i] && !anchors_[i] && backend_->DeviceGreedy(static_cast<int32_t>(i)) == device)
      same.push_back(static_cast<int32_t>(i));
  for (int32_t s : slots)
    if (same.size() < slots.size() && std::find(same.begin(), same.end(), s) == same.end()) same.push_back(s);
  return same;
}

// Drops an anchor nobody is forked from: ready ones leave the prefix cache,
// unfinished ones were never in it.
void Scheduler::EvictAnchor(int32_t seq) {
  auto& a = anchors_[seq];
  assert(a && cache_.Refs(seq) == 0);
  Retire(seq, a->n_past, a->n_past - (static_cast<int32_t>(a->tokens.size()) - a->reserved));
  cache_.Remove(seq);
  if (a->parent >= 0) cache_.Release(a->parent);
  a.reset();
}

// Frees a sequence id; its cells too, unless cells are monotonic: then the
// `created` cells it made itself stay, held by retired_seq_, until DrainCells.
void Scheduler::Retire(int32_t seq, int32_t n_past, int32_t created) {
  if (retired_seq_ >= 0 && n_past > 0) {
    backend_->CopySeq(seq, retired_seq_, n_past);
    retired_cells_ += std::max(0, created);
  }
  backend_->RemoveSeq(seq);
}

// monotonic_cells: with nothing running and no anchor being filled, frees
// every retired cell and every anchor, so that cells are taken from the
// start again, prefixes first. Returns whether anything was freed.
bool Scheduler::DrainCells() {
  if (retired_seq_ < 0 || AnyRunning()) return false;
  for (const auto& a : anchors_)
    if (a && !a->ready) return false;
  bool freed = retired_cells_ > 0;
  // Children first: an anchor forked from another holds a reference to it.
  for (bool again = true; again;) {
    again = false;
    for (size_t i = 0; i < anchors_.size(); ++i) {
      if (!anchors_[i] || cache_.Refs(static_cast<int32_t>(i)) != 0) continue;
      EvictAnchor(static_cast<int32_t>(i));
      freed = again = true;
    }
  }
  backend_->RemoveSeq(retired_seq_);
  retired_cells_ = 0;
  return freed;
}

// Recurrent memory forks only at the end of what a sequence decoded: whole
// entries only, there.
PrefixCache::Match Scheduler::ForkableMatch(const Request& r, size_t max_len) const {
  return backend_->PartialForks() ? cache_.Longest(r.prompt, max_len) : cache_.LongestWhole(r.prompt, max_len);
}

// monotonic_cells: with nothing running, a cache too full for a whole wave
// of requests like `r` (as many as can run, or as wait) is drained now, when
// draining makes room for it; else the wave would start with the few that
// fit and the cache drain after it anyway (requests of equal lengths run in
// waves: a partial one cost --deterministic 8% more steps on the rubric
// benchmark). Returns whether it drained.
bool Scheduler::DrainBeforeWave(const Request& r) {
  if (retired_seq_ < 0 || retired_cells_ == 0 || AnyRunning()) return false;
  const int32_t n = static_cast<int32_t>(r.prompt.size());
  if (n == 0) return false;
  const size_t max_len = static_cast<size_t>(n - 1);
  const PrefixCache::Match m = ForkableMatch(r, max_len);
  const int64_t choices = std::max(1, r.n);
  const int64_t wave = std::min<int64_t>(max_running_ / choices, static_cast<int64_t>(waiting_.size()));
  const int64_t need = wave * (n - m.length + choices * MaxNew(r));
  const int64_t free = FreeCells();
  return free < need && free + retired_cells_ >= need && DrainCells();
}

// Evicts idle anchors, least recently used first, until `cells` fit.
// (With monotonic cells an evicted anchor's cells stay taken until
// DrainCells: evicting frees nothing.)
bool Scheduler::MakeRoom(int32_t cells, int32_t keep_anchor) {
  if (FreeCells() < cells && retired_seq_ >= 0) {
    short_of_cells_ = true;
    return false;
  }
  while (FreeCells() < cells) {
    auto victim = cache_.LruIdle(keep_anchor);
    if (!victim) return false;
    EvictAnchor(*victim);
  }
  return true;
}

}  // namespace kvb::engine
