// fuzz_stream: the scheduler's output side (Scheduler::Accept / Stream /
// FinishChoice: stop strings, streaming deltas held back for stop prefixes
// and incomplete UTF-8, n choices, requeue after a failed decode) driven
// through a scripted fake Backend.
//
// The input picks a vocabulary of byte pieces, up to three requests (stop
// strings, n, max_tokens, stream, logprobs), each choice's token script
// (a script may make its sampler throw, as llama.cpp's grammar can), which
// decode steps fail (a full cache: the newest request is requeued; any
// other error: the step's requests are retried alone, a bounded number of
// times; a rerun has the same seeds, so the same script) and a cancel.
//
// Invariants, per finished choice: its tokens and text are exactly what an
// independent reference computes from its script (cut before the earliest
// stop string, at the first token that completes one); the text never
// contains a stop string; a request fails only for a reason the input
// gave it (a throwing sampler, injected failures, a cancel); a streaming choice's deltas are non-empty,
// concatenate to its text, all come before the Result, and each is valid
// UTF-8 when the text is; every request gets exactly one Result.
#pragma once

#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/scheduler.h"
#include "fuzz_check.h"

namespace kvb::fuzz {

namespace stream_fuzz {

using engine::Token;

constexpr int32_t kCtx = 256;
constexpr int32_t kPromptLen = 20;
constexpr Token kThrow = -2;  // in a script: the sampler throws

struct Script {
  std::vector<Token> tokens;  // the sampler's picks in order; then end of generation
};

class ScriptedSampler : public engine::Sampler {
 public:
  explicit ScriptedSampler(const Script* script) : script_(script) {}
  Token Sample(const float*) override {
    if (!script_ || step_ >= script_->tokens.size()) return 0;  // token 0: end of generation
    const Token t = script_->tokens[step_++];
    if (t == kThrow) throw std::runtime_error("scripted sampler failure");
    return t;
  }

 private:
  const Script* script_;
  size_t step_ = 0;
};

class ScriptedBackend : public engine::Backend {
 public:
  int32_t n_seq_max() const override { return 8; }
  int32_t n_cells() const override { return 1 << 14; }
  int32_t n_ctx_seq() const override { return kCtx; }
  int32_t n_batch() const override { return 16; }  // prompts take a few chunks
  int32_t n_vocab() const override { return static_cast<int32_t>(pieces.size()); }
  void CopySeq(int32_t, int32_t, int32_t) override {}
  void RemoveSeq(int32_t) override {}
  Status Decode(const std::vector<engine::BatchToken>& batch) override {
    if (batch.empty() || static_cast<int32_t>(batch.size()) > n_batch()) {
      bad_batch = true;  // checked after the run (KVB_FUZZ_CHECK may return, not with a Status)
      return Status::Internal("bad batch size");
    }
    const int step = decodes++;
    if (auto f = fail_steps.find(step); f != fail_steps.end())
      return f->second ? Status::Internal("injected failure") : Status::ResourceExhausted("injected: cache full");
    logits_.assign(batch.size() * pieces.size(), 0.0f);
    for (size_t i = 0; i < logits_.size(); ++i) logits_[i] = static_cast<float>((i * 7919) % 13) * 0.25f;
    return Status::Ok();
  }
  const float* Logits(int32_t i) override { return logits_.data() + static_cast<size_t>(i) * pieces.size(); }
  std::unique_ptr<engine::Sampler> NewSampler(const engine::SamplingParams& p) override {
    auto it = scripts.find(p.seed);
    return std::make_unique<ScriptedSampler>(it == scripts.end() ? nullptr : &it->second);
  }
  bool IsEndOfGeneration(Token t) const override { return t == 0; }
  std::string Piece(Token t) const override {
    return t > 0 && static_cast<size_t>(t) < pieces.size() ? pieces[static_cast<size_t>(t)] : std::string();
  }

  std::vector<std::string> pieces;        // by token; 0 is end of generation
  std::map<uint64_t, Script> scripts;     // by sampler seed (engine::SamplerSeed)
  std::map<int, bool> fail_steps;  // decode step -> true: an error other than a full cache
  int decodes = 0;
  bool bad_batch = false;

 private:
  std::vector<float> logits_;
};

// The reference: what a choice must produce from its script.
struct Expected {
  std::vector<Token> tokens;
  std::string text;
  engine::FinishReason finish = engine::FinishReason::kStop;
  bool throws = false;  // the sampler throws before the choice ends
};

inline Expected Reference(const Script& script, const std::vector<std::string>& pieces,
                          const std::vector<std::string>& stops, int32_t max_new) {
  Expected e;
  if (max_new <= 0) return e;
  for (size_t i = 0;; ++i) {
    const Token t = i < script.tokens.size() ? script.tokens[i] : 0;
    if (t == 0) return e;  // end of generation: kStop
    if (t == kThrow) {
      e.throws = true;
      return e;
    }
    e.tokens.push_back(t);
    e.text += pieces[static_cast<size_t>(t)];
    size_t cut = std::string::npos;
    for (const auto& s : stops)
      if (!s.empty()) cut = std::min(cut, e.text.find(s));
    if (cut != std::string::npos) {
      e.text.resize(cut);
      return e;
    }
    if (static_cast<int32_t>(e.tokens.size()) >= max_new) {
      e.finish = engine::FinishReason::kLength;
      return e;
    }
  }
}

}  // namespace stream_fuzz

inline void FuzzStream(const uint8_t* data, size_t size) {
  using namespace stream_fuzz;
  ByteReader in(data, size);
  ScriptedBackend backend;

  // Vocabulary: token 0 is end of generation, then 3..15 byte pieces of 0..4 bytes.
  const uint32_t n_tokens = 4 + in.Below(13);
  backend.pieces.push_back("");
  for (uint32_t t = 1; t < n_tokens; ++t) backend.pieces.push_back(in.Bytes(in.Below(5)));
  // Decode steps that fail (at most 3, among the first 32; bit 5: not a full cache).
  bool internal_failures = false;
  for (uint32_t k = in.Below(4); k > 0; --k) {
    const uint8_t b = in.Byte();
    backend.fail_steps[b & 31] = (b & 32) != 0;
    internal_failures = internal_failures || (b & 32) != 0;
  }
  const uint32_t cancel = in.Byte();  // bit 7: cancel request (bits 0-1) at step (bits 2-6)

  struct Want {
    engine::Request req;
    std::vector<Script> scripts;
  };
  std::vector<Want> wants;
  const uint32_t n_requests = 1 + in.Below(3);
  for (uint32_t i = 0; i < n_requests; ++i) {
    Want w;
    engine::Request& r = w.req;
    r.id = 100 + i;
    for (int32_t k = 0; k < kPromptLen; ++k) r.prompt.push_back(1 + (k < 17 ? k : k + static_cast<int32_t>(i)) % 50);
    r.sampling.temperature = 0;
    r.sampling.seed = i;
    const uint32_t flags = in.Byte();
    r.stream = (flags & 3) != 0;
    r.logprobs = (flags & 4) != 0;
    r.top_logprobs = r.logprobs ? static_cast<int32_t>(in.Below(4)) : 0;
    r.n = 1 + static_cast<int32_t>(in.Below(3));
    r.sampling.max_tokens = (flags & 8) ? -1 : 1 + static_cast<int32_t>(in.Below(40));
    for (uint32_t k = in.Below(5); k > 0; --k) r.sampling.stop.push_back(in.Bytes(in.Below(7)));
    for (int32_t c = 0; c < r.n; ++c) {
      Script s;
      for (uint32_t k = in.Below(48); k > 0; --k) {
        const uint8_t b = in.Byte();
        s.tokens.push_back(b == 0xFF ? kThrow : static_cast<Token>(b % n_tokens));
      }
      backend.scripts[engine::SamplerSeed(r.sampling.seed, r.prompt, c)] = s;
      w.scripts.push_back(std::move(s));
    }
    wants.push_back(std::move(w));
  }

  if (std::getenv("KVB_FUZZ_VERBOSE")) {
    std::string d = "fuzz_stream: pieces";
    for (size_t t = 1; t < backend.pieces.size(); ++t) d += " " + std::to_string(t) + "=" + Show(backend.pieces[t]);
    d += "; failing decodes:";
    for (const auto& [f, internal] : backend.fail_steps) d += " " + std::to_string(f) + (internal ? "(error)" : "(full)");
    if (cancel & 0x80) d += "; cancel " + std::to_string(100 + (cancel & 3)) + " at step " + std::to_string((cancel >> 2) & 31);
    for (const auto& w : wants) {
      d += "\n  request " + std::to_string(w.req.id) + (w.req.stream ? " stream" : "") + " n=" + std::to_string(w.req.n) +
           " max_tokens=" + std::to_string(w.req.sampling.max_tokens) + " stops:";
      for (const auto& st : w.req.sampling.stop) d += " " + Show(st);
      for (const auto& sc : w.scripts) {
        d += "\n    script:";
        for (Token t : sc.tokens) d += t == kThrow ? std::string(" throw") : " " + std::to_string(t);
      }
    }
    std::fprintf(stderr, "%s\n", d.c_str());
  }

  std::map<uint64_t, engine::Result> results;
  std::map<std::pair<uint64_t, int32_t>, std::vector<std::string>> deltas;
  engine::Scheduler scheduler(
      &backend, engine::SchedulerOptions{.max_anchors = 1, .min_anchor_gain = 8},
      [&](engine::Result&& r) {
        KVB_FUZZ_CHECK(!results.count(r.id), "request " + std::to_string(r.id) + " answered twice");
        results.emplace(r.id, std::move(r));
      },
      [&](uint64_t id, int32_t choice, std::string_view text) {
        KVB_FUZZ_CHECK(!results.count(id), "a delta after the request's Result");
        deltas[{id, choice}].emplace_back(text);
      });
  for (auto& w : wants) scheduler.Submit(w.req);
  int steps = 0;
  while (scheduler.Step()) {
    if ((cancel & 0x80) && steps == static_cast<int>((cancel >> 2) & 31))
      scheduler.Cancel(100 + (cancel & 3));
    KVB_FUZZ_CHECK(++steps < 100000, "the scheduler makes no progress");
  }
  KVB_FUZZ_CHECK(scheduler.Idle(), "Step() returned false with work left");
  KVB_FUZZ_CHECK(!backend.bad_batch, "a Decode batch was empty or over n_batch");

  for (const auto& w : wants) {
    const engine::Request& r = w.req;
    auto it = results.find(r.id);
    KVB_FUZZ_CHECK(it != results.end(), "request " + std::to_string(r.id) + " never answered");
    const engine::Result& res = it->second;
    const int32_t max_new = r.sampling.max_tokens < 0 ? kCtx - kPromptLen : std::min(r.sampling.max_tokens, kCtx - kPromptLen);
    std::vector<Expected> expected;
    bool throws = false;
    for (int32_t c = 0; c < r.n; ++c) {
      expected.push_back(Reference(w.scripts[static_cast<size_t>(c)], backend.pieces, r.sampling.stop, max_new));
      throws = throws || expected.back().throws;
    }
    const bool cancelled = (cancel & 0x80) && (cancel & 3) == r.id - 100;
    if (!res.status.ok()) {
      const StatusCode code = res.status.code();
      KVB_FUZZ_CHECK((code == StatusCode::kCancelled && cancelled) ||
                         (code == StatusCode::kResourceExhausted && !backend.fail_steps.empty()) ||
                         (code == StatusCode::kInternal && (throws || internal_failures)),
                     "request " + std::to_string(r.id) + " failed for no reason the input gave: " + res.status.ToString());
      continue;
    }
    KVB_FUZZ_CHECK(!throws, "request " + std::to_string(r.id) + " succeeded although a sampler threw");
    KVB_FUZZ_CHECK(static_cast<int32_t>(res.choices.size()) == r.n, "wrong number of choices");
    KVB_FUZZ_CHECK(res.text == res.choices[0].text, "Result.text is not choice 0's text");
    for (int32_t c = 0; c < r.n; ++c) {
      const engine::Choice& ch = res.choices[static_cast<size_t>(c)];
      const std::string where = "request " + std::to_string(r.id) + " choice " + std::to_string(c);
      for (const auto& stop : r.sampling.stop)
        KVB_FUZZ_CHECK(stop.empty() || ch.text.find(stop) == std::string::npos,
                       where + ": the text " + Show(ch.text) + " contains the stop string " + Show(stop));
      const Expected& e = expected[static_cast<size_t>(c)];
      KVB_FUZZ_CHECK(ch.tokens == e.tokens, where + ": tokens differ from the reference (" +
                                                std::to_string(ch.tokens.size()) + " vs " +
                                                std::to_string(e.tokens.size()) + ")");
      KVB_FUZZ_CHECK(ch.text == e.text, where + ": text " + Show(ch.text) + ", reference " + Show(e.text));
      KVB_FUZZ_CHECK(ch.finish == e.finish, where + ": finish reason differs from the reference");
      if (r.logprobs) KVB_FUZZ_CHECK(ch.logprobs.size() == ch.tokens.size(), where + ": one logprob per token");
      if (!r.stream) {
        KVB_FUZZ_CHECK(!deltas.count({r.id, c}), where + ": deltas for a request that does not stream");
        continue;
      }
      std::string joined;
      const bool utf8 = IsValidUtf8(ch.text);
      for (const auto& d : deltas[{r.id, c}]) {
        KVB_FUZZ_CHECK(!d.empty(), where + ": an empty delta");
        KVB_FUZZ_CHECK(!utf8 || IsValidUtf8(d), where + ": delta " + Show(d) + " splits a UTF-8 character of " +
                                                      Show(ch.text));
        joined += d;
      }
      KVB_FUZZ_CHECK(joined == ch.text, where + ": deltas " + Show(joined) + " != text " + Show(ch.text));
    }
  }
}

}  // namespace kvb::fuzz
