// The engine loop's logic (DESIGN.md section 2), independent of llama.cpp:
// admission with shared-prefix forking and anchors, mixed decode + chunked
// prefill steps, per-request sampling, finishing and anchor eviction.
//
// Not thread-safe: one thread (the engine's) calls everything.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/backend.h"
#include "engine/prefix_cache.h"
#include "engine/types.h"

namespace kvb::engine {

struct SchedulerOptions {
  int32_t max_anchors = 4;          // sequence ids kept for shared prefixes
  int32_t min_anchor_gain = 16;     // an anchor must add at least this many shared tokens
  int32_t lookahead = 256;          // waiting requests compared to find shared prefixes
  int32_t reserve_cells = 0;        // cells kept free as a safety margin
  // A request in a failed step (llama_decode error, an exception) runs
  // again alone; after this many failed steps it fails with an error.
  int32_t max_attempts = 3;
  // Deterministic mode: a finished sequence's cells are not freed but moved
  // to the backend's last sequence id (kept out of use), and freed all at
  // once, with every anchor, when the cache is full and nothing runs. Cells
  // are then taken in increasing order, so every sequence sees its prefix and
  // its own tokens in position order, whatever else runs beside it.
  bool monotonic_cells = false;
};

struct EngineStats {
  int64_t requests_done = 0;
  int64_t requests_failed = 0;
  int64_t prompt_tokens = 0;        // over finished requests
  int64_t cached_tokens = 0;        // of those, served from a shared prefix
  int64_t prefill_tokens = 0;       // prompt tokens actually decoded (anchors included)
  int64_t completion_tokens = 0;   // over finished requests
  int64_t generated_tokens = 0;    // every token sampled, as it is (cancelled and requeued work included)
  int64_t device_picks = 0;         // of those, picked on the device (Backend::SetDeviceGreedy)
  int64_t steps = 0;
  double step_seconds = 0;          // engine steps' wall time (admission, decode, sampling, output)
  double decode_seconds = 0;        // of that, in the backend's Decode (llama_decode until its outputs are ready)
  double host_seconds() const { return step_seconds > decode_seconds ? step_seconds - decode_seconds : 0.0; }
  int64_t requeued = 0;             // sequences pushed back after a failed decode
  int64_t failed_steps = 0;         // steps whose decode failed (not for lack of cells)
  int32_t active = 0;               // sequences running
  int32_t waiting = 0;
  int32_t anchors = 0;
  int32_t cells_used = 0;           // KV cells holding tokens now (shared cells counted once)
  int32_t cells_reserved = 0;       // worst-case cells held by admitted work
  int32_t cells_peak = 0;          // peak of cells_used
  int32_t cells_total = 0;
};

class Scheduler {
 public:
  using ResultFn = std::function<void(Result&&)>;
  // Text of a streaming request (Request::stream) as it becomes final, per
  // choice (0..n-1): held back while it could still be the start of a stop
  // string or is an incomplete UTF-8 character. The deltas of a choice
  // concatenate to its Choice::text; a choice's last delta comes when it
  // finishes, all of them before the request's Result.
  using DeltaFn = std::function<void(uint64_t id, int32_t choice, std::string_view text)>;

  // Called with the requests admitted in a step, before their first token
  // is decoded (crash guard: the caller records them as in flight,
  // batch/crash_guard.h). Once per step, so the record is one write.
  using AdmitFn = std::function<void(const std::vector<uint64_t>& ids)>;

  Scheduler(Backend* backend, SchedulerOptions options, ResultFn on_result, DeltaFn on_delta = nullptr,
            AdmitFn on_admit = nullptr);
  ~Scheduler();

  // Queues a request. Requests sharing a prefix should be submitted next to
  // each other: anchors are made from prefixes shared within the lookahead.
  // `urgent` requests go to the front of the queue (interactive traffic).
  void Submit(Request request, bool urgent = false);
  // Requests with n > 1 are admitted when n sequence ids and the worst case
  // of all choices (unique prompt + n x max new tokens) are free; n above
  // max_running() fails the request (InvalidArgument).
  // Drops a waiting or running request; its Result has status Cancelled.
  // Unknown (e.g. already finished) ids are ignored.
  void Cancel(uint64_t id);

  // Runs one step: admit, decode one batch, sample, finish. Returns false
  // when there was nothing to do.
  bool Step();

  bool Idle() const;
  // An exception escaped Step (a bug, or llama.cpp throwing): handled as a
  // failed step, so the requests in it are retried alone, a bounded number
  // of times, instead of the engine stopping.
  void RecoverFromException(const std::string& what);
  const EngineStats& stats() const { return stats_; }
  // The last decode of Step (StepInfo::seconds is the caller's to fill).
  const StepInfo& last_step() const { return last_step_; }
  // The caller's wall time of a Step that decoded (EngineStats::step_seconds).
  void RecordStepTime(double seconds) { stats_.step_seconds += seconds; }
  // Max sequences that may run at once (excluding anchors).
  int32_t max_running() const { return max_running_; }

 private:
  struct Seq;
  struct Group;
  struct Anchor;

  void Admit();
  bool TryAdmit(Request& r);
  int32_t SharedWithWaiting(const Request& r, size_t max_len, size_t floor) const;
  std::optional<int32_t> FreeSlot(bool anchor) const;
  std::vector<int32_t> FreeSlots(int32_t n) const;
  // `slots` (free) replaced by free ids already set to `device` greedy, as
  // far as there are: a change re-plans llama.cpp's graph, so a job mixing
  // greedy and other requests keeps each id on one side.
  std::vector<int32_t> PreferSlots(std::vector<int32_t> slots, bool device) const;
  bool MakeRoom(int32_t cells, int32_t keep_anchor);
  void EvictAnchor(int32_t seq);
  void Retire(int32_t seq, int32_t n_past, int32_t created);
  bool DrainCells();
  bool DrainBeforeWave(const Request& r);
  // The longest resident prefix of r's prompt (at most max_len tokens) it can fork from.
  PrefixCache::Match ForkableMatch(const Request& r, size_t max_len) const;
  int32_t FreeCells() const;
  int32_t MaxNew(const Request& r) const;
  void Fail(Request& r, Status status);
  void FailGroup(Seq& s, Status status);
  void StepFailed(const Status& status);
  bool Suspect(const Request& r) const { return r.isolate || failures_.count(r.id) != 0; }
  bool AnyRunning() const;  // a request holds a sequence
  bool FailedBefore(const Request& r) const { return failures_.count(r.id) != 0; }
  void Sample(Seq& s, const float* logits);
  void Take(Seq& s, Token t, const float* logits);
  void Fork(Seq& leader, const float* logits);
  void FinishChoice(Seq& s);
  void Requeue(Seq& s);
  void Release(Seq& s);
  Request ReleaseGroup(Group& g);
  bool Accept(Seq& s, Token t);
  void Stream(Seq& s, bool final);

  Backend* backend_;
  SchedulerOptions options_;
  ResultFn on_result_;
  DeltaFn on_delta_;
  AdmitFn on_admit_;
  std::vector<uint64_t> admitted_;  // this step's admissions, for on_admit_
  bool abort_admitted_ = false;     // a test hook asked to crash once they are recorded
  PrefixCache cache_;
  int32_t max_running_;
  // monotonic_cells: the sequence id holding retired cells, how many, and
  // whether the last admission failed for lack of cells.
  int32_t retired_seq_ = -1;
  int32_t retired_cells_ = 0;
  bool short_of_cells_ = false;

  std::deque<Request> waiting_;
  std::vector<std::unique_ptr<Seq>> seqs_;        // by sequence id; null = free
  std::vector<std::unique_ptr<Anchor>> anchors_;  // by sequence id; null = not an anchor
  // Requests that had an anchor made for them: prompt tokens creditable as
  // cached (what was resident before the anchor), by request id.
  std::unordered_map<uint64_t, int32_t> credit_;
  // Requeued streaming requests: bytes of text already streamed per choice,
  // by request id (the rerun regenerates the same text; only what is new is sent).
  std::unordered_map<uint64_t, std::vector<size_t>> streamed_;
  // Failed steps per request: such a request is a suspect and runs alone
  // (never beside another request, never forked from an anchor), so a
  // request that breaks the engine fails by itself and the others go on.
  std::unordered_map<uint64_t, int32_t> failures_;
  int32_t anchor_failures_ = 0;  // consecutive failed steps holding only anchors
  bool anchors_disabled_ = false;
  int64_t admit_order_ = 0;
  EngineStats stats_;
  StepInfo last_step_;
};

}  // namespace kvb::engine
