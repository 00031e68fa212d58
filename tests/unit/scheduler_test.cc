// Scheduler tests on a fake Backend that models a unified KV cache: cells
// carry a set of sequence ids, CopySeq shares cells, and a token's logits
// are a function of exactly the tokens its sequence can see. So a request
// that saw anything but its own prompt would produce different tokens.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <limits>
#include <map>
#include <optional>
#include <set>

namespace kvb::engine {
namespace {

constexpr int32_t kVocab = 64;

class FakeBackend : public Backend {
 public:
  FakeBackend(int32_t seqs, int32_t cells, int32_t ctx, int32_t batch)
      : seqs_(seqs), n_cells_(cells), ctx_(ctx), batch_(batch), cells_(cells) {}

  int32_t n_seq_max() const override { return seqs_; }
  int32_t n_cells() const override { return n_cells_; }
  int32_t n_ctx_seq() const override { return ctx_; }
  int32_t n_batch() const override { return batch_; }
  int32_t n_vocab() const override { return kVocab; }

  void CopySeq(int32_t src, int32_t dst, int32_t n) override {
    ++copies;
    // Recurrent memory: a state exists only at the end of what src decoded.
    if (!partial_forks) {
      EXPECT_EQ(static_cast<int32_t>(Visible(src).size()), n) << "partial fork of seq " << src;
    }
    for (auto& c : cells_)
      if (c.seqs.count(src) && c.pos < n) c.seqs.insert(dst);
  }
  void RemoveSeq(int32_t seq) override {
    for (auto& c : cells_) c.seqs.erase(seq);
  }
  bool PartialForks() const override { return partial_forks; }
  Status Decode(const std::vector<BatchToken>& batch) override {
    EXPECT_LE(static_cast<int32_t>(batch.size()), batch_);
    for (const BatchToken& b : batch) {
      if (b.token == poison) {
        ++poison_failures;
        return Status::Internal("llama_decode failed with code -1");
      }
    }
    if (fail_next) {
      fail_next = false;
      return Status::ResourceExhausted("injected");
    }
    logits_.assign(batch.size(), {});
    for (size_t i = 0; i < batch.size(); ++i) {
      const BatchToken& b = batch[i];
      // The sequence must hold exactly positions [0, pos) before this token.
      std::vector<Token> seen = Visible(b.seq);
      EXPECT_EQ(static_cast<int32_t>(seen.size()), b.pos) << "seq " << b.seq;
      Cell* free_cell = nullptr;
      for (auto& c : cells_)
        if (c.seqs.empty()) {
          free_cell = &c;
          break;
        }
      if (!free_cell) {
        ADD_FAILURE() << "KV cache overflow: admission let too much in";
        return Status::ResourceExhausted("full");
      }
      // Out of order: a cell before one the sequence already sees.
      for (size_t c = static_cast<size_t>(free_cell - cells_.data()) + 1; c < cells_.size(); ++c)
        if (cells_[c].seqs.count(b.seq)) {
          ++out_of_order;
          break;
        }
      *free_cell = Cell{b.token, b.pos, {b.seq}};
      seen.push_back(b.token);
      if (b.logits) logits_[i] = LogitsFor(seen);
    }
    device_tokens_.assign(batch.size(), kNoToken);
    for (size_t i = 0; i < batch.size(); ++i)
      if (batch[i].logits && device_sampling && device_seqs.count(batch[i].seq))
        device_tokens_[i] = static_cast<Token>(std::max_element(logits_[i].begin(), logits_[i].end()) - logits_[i].begin());
    int32_t used = 0;
    for (auto& c : cells_) used += !c.seqs.empty();
    peak_cells = std::max(peak_cells, used);
    decoded_tokens += static_cast<int64_t>(batch.size());
    ++decodes;
    return Status::Ok();
  }
  const float* Logits(int32_t i) override {
    // A device pick's logits stay on the device: reading them is a bug.
    EXPECT_EQ(device_tokens_.at(i), kNoToken) << "logits read for a token picked on the device";
    ++logits_reads;
    return logits_.at(i).data();
  }
  void SetDeviceGreedy(int32_t seq, bool on) override {
    if (!device_sampling || DeviceGreedy(seq) == on) return;
    ++device_changes;
    if (on) device_seqs.insert(seq);
    else device_seqs.erase(seq);
  }
  bool DeviceGreedy(int32_t seq) const override { return device_seqs.count(seq) > 0; }
  Token DeviceToken(int32_t i) override { return device_tokens_.at(i); }

  // The argmax, shifted by a seed-dependent offset when the seed is not 0:
  // choices of one request (different seeds) then differ.
  class Argmax : public Sampler {
   public:
    explicit Argmax(uint64_t seed) : shift_(static_cast<Token>(seed % 61)) {}
    bool PlainGreedy() const override { return shift_ == 0; }
    Token Sample(const float* l) override {
      const Token t = static_cast<Token>(std::max_element(l, l + kVocab) - l);
      return shift_ == 0 ? t : 1 + (t + shift_) % (kVocab - 1);
    }

   private:
    Token shift_;
  };
  std::unique_ptr<Sampler> NewSampler(const SamplingParams& p) override {
    sampler_max_tokens = std::max(sampler_max_tokens, p.max_tokens);
    return std::make_unique<Argmax>(p.top_k == 1 ? 0 : p.seed);  // top_k 1: the plain argmax
  }
  bool IsEndOfGeneration(Token t) const override { return t == 0; }
  std::string Piece(Token t) const override { return std::string(1, static_cast<char>('a' + t % 26)); }

  // What a sequence can attend to, by position.
  std::vector<Token> Visible(int32_t seq) const {
    std::map<int32_t, Token> by_pos;
    for (const auto& c : cells_)
      if (c.seqs.count(seq)) {
        EXPECT_FALSE(by_pos.count(c.pos)) << "two cells at one position";
        by_pos[c.pos] = c.token;
      }
    std::vector<Token> out;
    for (auto [p, t] : by_pos) {
      EXPECT_EQ(p, static_cast<int32_t>(out.size())) << "hole in seq " << seq;
      out.push_back(t);
    }
    return out;
  }
  static std::vector<float> LogitsFor(const std::vector<Token>& seen) {
    uint64_t h = 1469598103934665603ULL;
    for (Token t : seen) h = (h ^ static_cast<uint64_t>(t)) * 1099511628211ULL;
    std::vector<float> l(kVocab, 0.0f);
    l[(h >> 7) % kVocab] = 1.0f;
    return l;
  }

  bool fail_next = false;
  bool partial_forks = true;
  Token poison = -1;  // a batch holding this token fails as llama_decode -1 does
  int32_t poison_failures = 0;
  int32_t sampler_max_tokens = 0;  // largest max_tokens a sampler was made with
  int32_t peak_cells = 0;
  int32_t copies = 0;
  int64_t decoded_tokens = 0;
  int64_t decodes = 0;  // steps
  int64_t out_of_order = 0;  // tokens placed in a cell before one their sequence sees
  bool device_sampling = false;  // honour SetDeviceGreedy: argmax picks made in Decode
  std::set<int32_t> device_seqs;
  int64_t logits_reads = 0;
  int64_t device_changes = 0;  // SetDeviceGreedy calls that changed an id's side

 private:
  struct Cell {
    Token token = -1;
    int32_t pos = -1;
    std::set<int32_t> seqs;
  };
  int32_t seqs_, n_cells_, ctx_, batch_;
  std::vector<Cell> cells_;
  std::vector<std::vector<float>> logits_;
  std::vector<Token> device_tokens_;
};

Request MakeRequest(uint64_t id, std::vector<Token> prompt, int32_t max_tokens) {
  Request r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0;
  r.sampling.max_tokens = max_tokens;
  return r;
}

std::vector<Token> SharedPrompt(int32_t shared, uint64_t id, int32_t unique) {
  std::vector<Token> p;
  for (int32_t i = 0; i < shared; ++i) p.push_back(1 + i % 50);
  for (int32_t i = 0; i < unique; ++i) p.push_back(1 + static_cast<Token>((id * 7 + i * 13) % 60));
  return p;
}

std::map<uint64_t, Result> RunAll(FakeBackend& backend, std::vector<Request> requests, SchedulerOptions opts = {}) {
  std::map<uint64_t, Result> out;
  Scheduler s(&backend, opts, [&](Result&& r) {
    EXPECT_FALSE(out.count(r.id)) << "answered twice";
    out[r.id] = std::move(r);
  });
  for (auto& r : requests) s.Submit(std::move(r));
  int guard = 0;
  while (s.Step()) {
    if (++guard > 100000) {
      ADD_FAILURE() << "no progress";
      break;
    }
  }
  EXPECT_TRUE(s.Idle());
  return out;
}

Result RunAlone(Request r) {
  FakeBackend alone(4, 4096, 4096, 512);
  std::vector<Request> one;
  one.push_back(std::move(r));
  auto out = RunAll(alone, std::move(one), SchedulerOptions{.max_anchors = 0});
  return out.begin()->second;
}

TEST(Scheduler, SharedPrefixIsDecodedOnceAndForkedIntoEverySequence) {
  FakeBackend backend(12, 4096, 4096, 512);
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 20; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(300, i, 6), 8));
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), 20u);
  // The 300-token prefix was decoded once, not 20 times.
  EXPECT_LT(backend.decoded_tokens, 300 + 20 * (6 + 8) + 50);
  EXPECT_LT(backend.peak_cells, 300 + 12 * (6 + 8) + 50);
  int with_cache = 0;
  for (auto& [id, r] : results) {
    EXPECT_TRUE(r.status.ok());
    with_cache += r.cached_tokens >= 300;
    // Sharing cells changes nothing: each answer equals the request run alone.
    Result alone = RunAlone(reqs[id]);
    EXPECT_EQ(r.tokens, alone.tokens) << "request " << id;
  }
  EXPECT_EQ(results[0].cached_tokens, 0);  // its prefix was computed for it
  EXPECT_EQ(with_cache, 19);
}

// Device sampling: plain greedy requests (top_k 1 here) get their tokens from
// Backend::DeviceToken and never read logits (FakeBackend fails the test if
// they do); n > 1, logprobs and shifted samplers keep reading logits. The
// answers are those of the same run without device sampling.
TEST(Scheduler, PlainGreedyRequestsTakeTheDevicesPicksAndOthersReadLogits) {
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 16; ++i) {
    Request r = MakeRequest(i, SharedPrompt(100, i, 5), 6 + static_cast<int32_t>(i % 3));
    if (i % 4 != 3) r.sampling.top_k = 1;
    if (i % 4 == 1) r.logprobs = true;
    if (i % 4 == 2) r.n = 2;
    reqs.push_back(std::move(r));
  }
  FakeBackend host(6, 4096, 4096, 512);
  FakeBackend device(6, 4096, 4096, 512);
  device.device_sampling = true;
  auto a = RunAll(host, reqs);
  auto b = RunAll(device, reqs);
  ASSERT_EQ(b.size(), reqs.size());
  for (auto& [id, r] : a) {
    ASSERT_TRUE(b[id].status.ok()) << b[id].status.ToString();
    ASSERT_EQ(r.choices.size(), b[id].choices.size());
    for (size_t c = 0; c < r.choices.size(); ++c) EXPECT_EQ(r.choices[c].tokens, b[id].choices[c].tokens) << id;
    EXPECT_EQ(r.choices[0].logprobs.size(), b[id].choices[0].logprobs.size()) << id;
  }
  // Only the four plain greedy requests (i % 4 == 0) skipped the logits.
  EXPECT_LT(device.logits_reads, host.logits_reads);
  int64_t plain = 0;
  for (auto& [id, r] : b)
    if (id % 4 == 0) plain += static_cast<int64_t>(r.tokens.size());
  EXPECT_GE(host.logits_reads - device.logits_reads, plain);
  EXPECT_TRUE(device.device_seqs.size() <= 6u);
}

// A job alternating greedy requests and requests that need logits: ids stay
// on their side (each change re-plans llama.cpp's graph), so the changes are
// bounded by the ids, not by the requests.
TEST(Scheduler, MixedJobsKeepEachSequenceIdOnOneSideOfDeviceSampling) {
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 120; ++i) {
    // Staggered lengths: requests finish one by one and ids are reused at random.
    Request r = MakeRequest(i, SharedPrompt(50, i, 4), 1 + static_cast<int32_t>((i * 7) % 11));
    r.sampling.top_k = 1;
    r.logprobs = (i * 5) % 3 == 1;
    reqs.push_back(std::move(r));
  }
  FakeBackend backend(6, 4096, 4096, 512);
  backend.device_sampling = true;
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), reqs.size());
  for (auto& [id, r] : results) EXPECT_TRUE(r.status.ok());
  EXPECT_LE(backend.device_changes, 12) << "ids flip sides with the requests";
  EXPECT_GT(backend.device_changes, 0);
}

TEST(Scheduler, AdmissionNeverOverflowsTheCacheAndEveryRequestFinishes) {
  FakeBackend backend(8, 200, 200, 64);  // room for only a few requests at a time
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 30; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(0, i, 20 + i % 7), 30));
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), 30u);
  EXPECT_LE(backend.peak_cells, 200);
  for (auto& [id, r] : results) {
    EXPECT_TRUE(r.status.ok()) << r.status.ToString();
    EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens);
  }
}

TEST(Scheduler, RespectsMaxRunningSequences) {
  FakeBackend backend(6, 4096, 4096, 512);
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 2}, [](Result&&) {});
  EXPECT_EQ(s.max_running(), 4);
  for (uint64_t i = 0; i < 10; ++i) s.Submit(MakeRequest(i, SharedPrompt(0, i, 5), 50));
  s.Step();
  EXPECT_EQ(s.stats().active, 4);
  EXPECT_EQ(s.stats().waiting, 6);
}

TEST(Scheduler, PromptLongerThanTheContextFailsAndTheRestComplete) {
  FakeBackend backend(4, 512, 100, 64);
  std::vector<Request> reqs;
  reqs.push_back(MakeRequest(0, SharedPrompt(0, 0, 10), 5));
  reqs.push_back(MakeRequest(1, SharedPrompt(0, 1, 150), 5));
  reqs.push_back(MakeRequest(2, SharedPrompt(0, 2, 10), 5));
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_TRUE(results[0].status.ok());
  EXPECT_EQ(results[1].status.code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(results[2].status.ok());
}

TEST(Scheduler, MaxTokensIsClampedToTheContextAndReportedAsLength) {
  FakeBackend backend(2, 512, 40, 64);
  // The context holds 40 positions: a 30-token prompt leaves room for 10.
  // Find a prompt whose greedy run does not stop on EOS within those 10.
  Result res;
  for (uint64_t id = 0; id < 50; ++id) {
    auto results = RunAll(backend, {MakeRequest(id, SharedPrompt(0, id, 30), 1000)}, SchedulerOptions{.max_anchors = 0});
    res = results[id];
    if (res.finish == FinishReason::kLength) break;
  }
  EXPECT_EQ(res.finish, FinishReason::kLength);
  EXPECT_EQ(res.completion_tokens, 10);
}

TEST(Scheduler, FailedDecodeRequeuesTheNewestWithoutChangingResults) {
  FakeBackend backend(6, 4096, 4096, 512);
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 5; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(0, i, 12), 10));
  std::map<uint64_t, Result> out;
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 1}, [&](Result&& r) { out[r.id] = std::move(r); });
  for (auto r : reqs) s.Submit(std::move(r));
  s.Step();
  backend.fail_next = true;
  while (s.Step()) {
  }
  EXPECT_EQ(s.stats().requeued, 1);
  ASSERT_EQ(out.size(), 5u);
  for (auto& [id, r] : out) EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens);
}

TEST(Scheduler, FailedAnchorPrefillIsDroppedAndTheRequestsStillComplete) {
  FakeBackend backend(6, 4096, 4096, 512);
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 4; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(100, i, 5), 4));
  std::map<uint64_t, Result> out;
  Scheduler s(&backend, SchedulerOptions{}, [&](Result&& r) { out[r.id] = std::move(r); });
  for (auto r : reqs) s.Submit(std::move(r));
  backend.fail_next = true;  // the first step only prefills the anchor
  int guard = 0;
  while (s.Step() && ++guard < 1000) {
  }
  EXPECT_TRUE(s.Idle());
  ASSERT_EQ(out.size(), 4u);
  for (auto& [id, r] : out) {
    EXPECT_TRUE(r.status.ok()) << r.status.ToString();
    EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens);
  }
}

TEST(Scheduler, StopStringCutsTheTextBeforeIt) {
  FakeBackend backend(2, 512, 512, 64);
  auto r = MakeRequest(0, SharedPrompt(0, 5, 8), 40);
  Result free_run = RunAlone(r);
  ASSERT_GE(free_run.text.size(), 4u);
  r.sampling.stop = {free_run.text.substr(2, 2)};
  auto results = RunAll(backend, {r}, SchedulerOptions{.max_anchors = 0});
  const std::string& text = results[0].text;
  EXPECT_EQ(results[0].finish, FinishReason::kStop);
  EXPECT_EQ(text, free_run.text.substr(0, free_run.text.find(r.sampling.stop[0])));
}

TEST(Scheduler, StreamedDeltasConcatenateToTheTextAndHoldBackAStopPrefix) {
  FakeBackend backend(4, 4096, 4096, 512);
  auto r = MakeRequest(0, SharedPrompt(0, 5, 8), 40);
  Result free_run = RunAlone(r);
  ASSERT_GE(free_run.text.size(), 6u);
  r.stream = true;
  r.sampling.stop = {free_run.text.substr(4, 2)};
  std::vector<std::string> deltas;
  std::optional<Result> result;
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 0}, [&](Result&& res) { result = std::move(res); },
              [&](uint64_t id, int32_t choice, std::string_view text) {
                EXPECT_EQ(id, 0u);
                EXPECT_EQ(choice, 0);
                EXPECT_FALSE(result.has_value()) << "a delta after the result";
                deltas.emplace_back(text);
              });
  s.Submit(r);
  while (s.Step()) {
  }
  ASSERT_TRUE(result.has_value());
  std::string joined;
  for (const auto& d : deltas) {
    EXPECT_FALSE(d.empty());
    joined += d;
  }
  EXPECT_EQ(joined, result->text);
  EXPECT_EQ(result->text, free_run.text.substr(0, free_run.text.find(r.sampling.stop[0])));
  EXPECT_GT(deltas.size(), 1u) << "text must flow as it is generated, not only at the end";
}

TEST(Scheduler, RequeuedStreamingRequestDoesNotRepeatText) {
  FakeBackend backend(6, 4096, 4096, 512);
  std::map<uint64_t, std::string> streamed;
  std::map<uint64_t, Result> out;
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 0}, [&](Result&& r) { out[r.id] = std::move(r); },
              [&](uint64_t id, int32_t, std::string_view text) { streamed[id] += text; });
  for (uint64_t i = 0; i < 4; ++i) {
    auto r = MakeRequest(i, SharedPrompt(0, i, 6), 12);
    r.stream = true;
    s.Submit(std::move(r));
  }
  for (int i = 0; i < 4; ++i) s.Step();
  backend.fail_next = true;
  while (s.Step()) {
  }
  EXPECT_EQ(s.stats().requeued, 1);
  ASSERT_EQ(out.size(), 4u);
  for (auto& [id, r] : out) EXPECT_EQ(streamed[id], r.text);
}

TEST(Scheduler, CancelDropsWaitingAndRunningRequests) {
  FakeBackend backend(2, 4096, 4096, 512);
  std::map<uint64_t, Result> out;
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 0}, [&](Result&& r) { out[r.id] = std::move(r); });
  for (uint64_t i = 0; i < 4; ++i) s.Submit(MakeRequest(i, SharedPrompt(0, i, 6), 50));
  s.Step();  // 0 and 1 run, 2 and 3 wait
  s.Cancel(1);
  s.Cancel(3);
  s.Cancel(42);  // unknown: ignored
  while (s.Step()) {
  }
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[1].status.code(), StatusCode::kCancelled);
  EXPECT_EQ(out[3].status.code(), StatusCode::kCancelled);
  EXPECT_TRUE(out[0].status.ok());
  EXPECT_TRUE(out[2].status.ok());
  EXPECT_EQ(out[2].tokens, RunAlone(MakeRequest(2, SharedPrompt(0, 2, 6), 50)).tokens);
  EXPECT_TRUE(s.Idle());
}

TEST(Scheduler, UrgentRequestsJumpTheQueue) {
  FakeBackend backend(3, 4096, 4096, 512);
  std::vector<uint64_t> order;
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 0}, [&](Result&& r) { order.push_back(r.id); });
  for (uint64_t i = 0; i < 6; ++i) s.Submit(MakeRequest(i, SharedPrompt(0, i, 5), 3));
  s.Submit(MakeRequest(99, SharedPrompt(0, 99, 5), 3), /*urgent=*/true);
  while (s.Step()) {
  }
  ASSERT_EQ(order.size(), 7u);
  auto pos = std::find(order.begin(), order.end(), 99u) - order.begin();
  EXPECT_LT(pos, 3);
}

TEST(Scheduler, IdleAnchorsAreEvictedWhenCellsAreNeeded) {
  FakeBackend backend(6, 400, 400, 256);
  std::vector<Request> reqs;
  // Two groups with different 150-token prefixes; both anchors cannot stay.
  for (uint64_t i = 0; i < 4; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(150, i, 5), 5));
  for (uint64_t i = 4; i < 8; ++i) {
    auto p = SharedPrompt(0, i, 0);
    for (int k = 0; k < 150; ++k) p.push_back(51 + k % 10);
    for (int k = 0; k < 5; ++k) p.push_back(1 + static_cast<Token>((i * 11 + k) % 60));
    reqs.push_back(MakeRequest(i, p, 5));
  }
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), 8u);
  for (auto& [id, r] : results) EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens) << id;
  EXPECT_LE(backend.peak_cells, 400);
}

// The seed that makes a single-choice request sample like choice `c` of r:
// samplers are seeded with SamplerSeed(seed, prompt, choice), and
// SamplerSeed(s, p, 0) == s ^ SamplerSeed(0, p, 0).
uint64_t AloneSeed(const Request& r, int32_t c) {
  return SamplerSeed(r.sampling.seed, r.prompt, c) ^ SamplerSeed(0, r.prompt, 0);
}

// n > 1: the prompt is decoded once; every choice forks its cells and then
// sees exactly the prompt and its own tokens (FakeBackend checks positions;
// logits depend on everything a sequence sees), so choice i equals the
// request run alone with choice i's seed.
TEST(Scheduler, ChoicesShareThePromptAndEachSeesOnlyItsOwnTokens) {
  FakeBackend backend(8, 4096, 4096, 512);
  auto r = MakeRequest(0, SharedPrompt(0, 3, 40), 12);
  r.sampling.seed = 5;
  r.n = 3;
  auto results = RunAll(backend, {r}, SchedulerOptions{.max_anchors = 0});
  ASSERT_EQ(results.size(), 1u);
  const Result& res = results[0];
  ASSERT_TRUE(res.status.ok()) << res.status.ToString();
  ASSERT_EQ(res.choices.size(), 3u);
  int32_t generated = 0;
  std::set<std::vector<Token>> distinct;
  for (int32_t i = 0; i < 3; ++i) {
    auto alone = r;
    alone.n = 1;
    alone.sampling.seed = AloneSeed(r, i);
    EXPECT_EQ(res.choices[i].tokens, RunAlone(alone).tokens) << "choice " << i;
    generated += static_cast<int32_t>(res.choices[i].tokens.size());
    distinct.insert(res.choices[i].tokens);
  }
  EXPECT_EQ(distinct.size(), 3u);
  EXPECT_EQ(res.tokens, res.choices[0].tokens);
  EXPECT_EQ(res.completion_tokens, generated);
  // 40 prompt tokens once (not three times) plus each choice's own tokens.
  EXPECT_LE(backend.decoded_tokens, 40 + generated);
  EXPECT_EQ(backend.copies, 2);
}

TEST(Scheduler, ChoiceZeroEqualsTheSingleChoiceAnswer) {
  auto r = MakeRequest(0, SharedPrompt(0, 9, 10), 10);
  r.sampling.seed = 77;
  Result one = RunAlone(r);
  r.n = 4;
  Result four = RunAlone(r);
  ASSERT_EQ(four.choices.size(), 4u);
  EXPECT_EQ(four.choices[0].tokens, one.tokens);
}

TEST(Scheduler, ChoicesForkFromASharedPrefixAnchorAndAdmissionReservesEveryChoice) {
  // 200 cells: a 3-choice request needs its unique prompt plus 3 x 30.
  FakeBackend backend(12, 300, 300, 128);
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 8; ++i) {
    auto r = MakeRequest(i, SharedPrompt(60, i, 5), 30);
    r.n = 3;
    r.sampling.seed = 100 + i;
    reqs.push_back(r);
  }
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), 8u);
  EXPECT_LE(backend.peak_cells, 300);
  for (auto& [id, res] : results) {
    ASSERT_TRUE(res.status.ok()) << res.status.ToString();
    ASSERT_EQ(res.choices.size(), 3u);
    for (int32_t c = 0; c < 3; ++c) {
      auto alone = reqs[id];
      alone.n = 1;
      alone.sampling.seed = AloneSeed(reqs[id], c);
      EXPECT_EQ(res.choices[c].tokens, RunAlone(alone).tokens) << id << " choice " << c;
    }
  }
}

TEST(Scheduler, MoreChoicesThanParallelSequencesFails) {
  FakeBackend backend(4, 4096, 4096, 512);
  auto r = MakeRequest(0, SharedPrompt(0, 1, 5), 5);
  r.n = 5;
  auto results = RunAll(backend, {r, MakeRequest(1, SharedPrompt(0, 2, 5), 5)}, SchedulerOptions{.max_anchors = 0});
  EXPECT_EQ(results[0].status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(results[0].status.message().find("--max-seqs"), std::string::npos);
  EXPECT_TRUE(results[1].status.ok());
}

TEST(Scheduler, RequeuedAndCancelledChoiceGroupsBehave) {
  FakeBackend backend(8, 4096, 4096, 512);
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 3; ++i) {
    auto r = MakeRequest(i, SharedPrompt(0, i, 8), 10);
    r.n = 2;
    r.sampling.seed = 9 + i;
    r.stream = true;
    reqs.push_back(r);
  }
  std::map<uint64_t, Result> out;
  std::map<std::pair<uint64_t, int32_t>, std::string> streamed;
  Scheduler s(&backend, SchedulerOptions{.max_anchors = 0}, [&](Result&& r) { out[r.id] = std::move(r); },
              [&](uint64_t id, int32_t choice, std::string_view text) { streamed[{id, choice}] += text; });
  for (auto r : reqs) s.Submit(std::move(r));
  s.Step();
  s.Step();
  backend.fail_next = true;  // the newest group is requeued, both choices
  s.Step();
  s.Cancel(0);
  while (s.Step()) {
  }
  EXPECT_TRUE(s.Idle());
  EXPECT_EQ(s.stats().requeued, 1);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].status.code(), StatusCode::kCancelled);
  for (uint64_t id : {1u, 2u}) {
    ASSERT_EQ(out[id].choices.size(), 2u);
    for (int32_t c = 0; c < 2; ++c) {
      auto alone = reqs[id];
      alone.n = 1;
      alone.stream = false;
      alone.sampling.seed = AloneSeed(reqs[id], c);
      EXPECT_EQ(out[id].choices[c].tokens, RunAlone(alone).tokens);
      EXPECT_EQ((streamed[{id, c}]), out[id].choices[c].text) << id << " choice " << c;
    }
  }
}

}  // namespace
}  // namespace kvb::engine

namespace kvb::engine {
namespace {

// Prompts P1, P1+P2a, P1+P2b (nested shared prefixes of different lengths),
// interleaved: the shape that livelocked recurrent models.
std::vector<Request> NestedPrefixRequests() {
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 24; ++i) {
    std::vector<Token> p = SharedPrompt(80, 0, 0);
    if (i % 3 != 0) {
      for (int32_t k = 0; k < 59; ++k) p.push_back(1 + static_cast<Token>((k * 5 + (i % 3) * 11) % 60));
    }
    for (int32_t k = 0; k < 4; ++k) p.push_back(1 + static_cast<Token>((i * 13 + k * 7) % 60));
    reqs.push_back(MakeRequest(i, std::move(p), 6));
  }
  return reqs;
}

TEST(SchedulerRecurrent, ForksOnlyAtAnAnchorsEndAndAnswersAsAlone) {
  FakeBackend backend(12, 4096, 4096, 512);
  backend.partial_forks = false;
  auto reqs = NestedPrefixRequests();
  auto results = RunAll(backend, reqs);
  ASSERT_EQ(results.size(), reqs.size());
  int32_t cached = 0;
  for (auto& [id, r] : results) {
    ASSERT_TRUE(r.status.ok()) << r.status.ToString();
    EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens) << "request " << id;
    cached += r.cached_tokens;
  }
  EXPECT_GT(cached, 0) << "whole-anchor forks still share prefixes";
}

TEST(SchedulerFaults, APoisonRequestFailsAloneAfterBoundedAttemptsAndTheRestFinish) {
  FakeBackend backend(8, 4096, 4096, 512);
  constexpr Token kPoison = 63;  // SharedPrompt never makes it
  backend.poison = kPoison;
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 12; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(40, i, 5), 6));
  reqs[5].prompt.push_back(kPoison);
  auto results = RunAll(backend, reqs, SchedulerOptions{.max_attempts = 3});
  ASSERT_EQ(results.size(), reqs.size());
  for (auto& [id, r] : results) {
    if (id == 5) {
      EXPECT_EQ(r.status.code(), StatusCode::kInternal);
      EXPECT_NE(r.status.message().find("3 times"), std::string::npos) << r.status.message();
      continue;
    }
    ASSERT_TRUE(r.status.ok()) << "request " << id << ": " << r.status.ToString();
    EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens) << "request " << id;
  }
  // Once in company, then twice alone: bounded, never a loop.
  EXPECT_EQ(backend.poison_failures, 3);
}

TEST(SchedulerFaults, PenaltyWindowIsSizedByWhatTheRequestCanGenerate) {
  FakeBackend backend(4, 4096, 256, 512);
  std::vector<Request> reqs;
  reqs.push_back(MakeRequest(0, SharedPrompt(0, 0, 10), std::numeric_limits<int32_t>::max()));
  reqs[0].sampling.presence_penalty = 0.1f;
  reqs[0].n = 2;
  auto results = RunAll(backend, reqs, SchedulerOptions{.max_anchors = 0});
  ASSERT_EQ(results.size(), 1u);
  EXPECT_TRUE(results[0].status.ok()) << results[0].status.ToString();
  EXPECT_LE(backend.sampler_max_tokens, 256);
  EXPECT_GT(backend.sampler_max_tokens, 0);
}

// Deterministic mode: finished sequences' cells are retired, not freed, so
// every token lands after everything its sequence sees (the fake, like
// llama.cpp, takes the first free cell); a full cache is drained when
// nothing runs. Without it, requests finishing at different steps leave
// holes that later tokens fill out of order.
TEST(Scheduler, MonotonicCellsKeepEverySequenceInPositionOrderAndDrainAFullCache) {
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 40; ++i)
    reqs.push_back(MakeRequest(i, SharedPrompt(120, i % 20, 5 + static_cast<int32_t>(i % 4)), 3 + static_cast<int32_t>(i * 7 % 11)));
  // Room for the prefix and about six requests at a time.
  FakeBackend plain(9, 400, 400, 256), mono(9, 400, 400, 256);
  auto expected = RunAll(plain, reqs);
  auto got = RunAll(mono, reqs, SchedulerOptions{.monotonic_cells = true});
  EXPECT_GT(plain.out_of_order, 0) << "the workload must leave holes for the check to mean anything";
  EXPECT_EQ(mono.out_of_order, 0);
  ASSERT_EQ(got.size(), reqs.size());
  for (auto& [id, r] : got) {
    ASSERT_TRUE(r.status.ok()) << id << ": " << r.status.ToString();
    EXPECT_EQ(r.tokens, expected[id].tokens) << id;
    EXPECT_EQ(r.tokens, RunAlone(reqs[id]).tokens) << id;
  }
  // 40 requests of ~20 cells each cannot all fit in 400 cells at once: the
  // cache was drained along the way (the prefix decoded again after each).
  EXPECT_GT(mono.decoded_tokens, plain.decoded_tokens);
}

TEST(Scheduler, MonotonicCellsDrainBeforeAWaveRatherThanRunAPartialOne) {
  // Requests of one length run in waves (four at a time here, 15 cells each).
  // The cache holds the prefix and a little over five waves: without draining
  // early, every sixth wave would start with the few requests that fit, run
  // its whole length, and the cache drain after it anyway.
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 42; ++i) reqs.push_back(MakeRequest(i, SharedPrompt(100, i, 5), 10));
  // The mode holds one sequence id for retired cells: the plain run gets one
  // id fewer, so that both run as many requests at once.
  FakeBackend plain(8, 400, 400, 256), mono(9, 400, 400, 256);
  auto expected = RunAll(plain, reqs);
  auto got = RunAll(mono, reqs, SchedulerOptions{.monotonic_cells = true});
  EXPECT_EQ(mono.out_of_order, 0);
  ASSERT_EQ(got.size(), reqs.size());
  for (auto& [id, r] : got) EXPECT_EQ(r.tokens, expected[id].tokens) << id;
  // Each drain decodes the 100-token prefix again, in one step; nothing else
  // may add steps.
  const int64_t drains = (mono.decoded_tokens - plain.decoded_tokens) / 100;
  EXPECT_GT(drains, 0) << "the workload must drain for the check to mean anything";
  EXPECT_LE(mono.decodes, plain.decodes + 2 * drains) << drains << " drains";
}

}  // namespace
}  // namespace kvb::engine
