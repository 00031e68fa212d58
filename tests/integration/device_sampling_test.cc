// Device sampling (ContextOptions::device_sampling): greedy requests get their
// tokens picked by llama.cpp's backend sampler, where the logits are
// computed, and everything else keeps sampling on the host. On the CPU the
// "device" is the CPU backend, so the same graph path is tested here; with
// --deterministic the logits are batch-invariant, so the answers must be the
// same tokens with it on and off, whatever mix shares a step.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>

#include "engine/engine.h"
#include "fixtures.h"

namespace kvb::testing {
namespace {

using engine::EngineOptions;
using engine::EngineStats;
using engine::Request;
using engine::Result;

struct EngineRun {
  std::map<uint64_t, Result> results;
  EngineStats stats;
};

EngineRun RunWithStats(const engine::Model& model, const std::vector<Request>& reqs, const EngineOptions& opts) {
  EngineRun run;
  std::mutex mu;
  std::condition_variable cv;
  auto eng = engine::Engine::Start(&model, opts, [&](Result&& r) {
    std::lock_guard<std::mutex> lock(mu);
    run.results[r.id] = std::move(r);
    cv.notify_all();
  });
  EXPECT_TRUE(eng.ok()) << eng.status().ToString();
  if (!eng.ok()) return run;
  (*eng)->SubmitAll(reqs);
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(300), [&] { return run.results.size() >= reqs.size(); }));
  }
  (*eng)->Stop();
  run.stats = (*eng)->Stats();
  return run;
}

using DeviceSampling = TinyModelSuite;

TEST_F(DeviceSampling, GreedyPicksOnTheDeviceAreTheHostsAndOtherRequestsKeepTheirLogits) {
  // Plain greedy (device), greedy with logprobs (host: they need the
  // logits), seeded sampling (host) and n = 2 (host) in the same steps.
  std::vector<Request> reqs;
  for (int i = 0; i < 12; ++i) {
    Request r = RubricRequest(*model_, i, 16, 6 + i % 5, i % 4 == 2 ? 0.8f : 0.0f);
    r.sampling.seed = 7 + static_cast<uint64_t>(i);
    if (i % 4 == 1) {
      r.logprobs = true;
      r.top_logprobs = 2;
    }
    if (i % 4 == 3) {
      r.n = 2;
      r.sampling.temperature = 0.9f;
    }
    reqs.push_back(std::move(r));
  }
  auto options = [](const char* mode) {
    EngineOptions o;
    o.context.deterministic = true;  // batch-invariant logits: on and off must agree exactly
    o.context.device_sampling = mode;
    o.context.max_seqs = 8;
    o.context.n_threads = 2;
    return o;
  };
  EngineRun on = RunWithStats(*model_, reqs, options("on"));
  EngineRun off = RunWithStats(*model_, reqs, options("off"));
  for (const Request& r : reqs) {
    ASSERT_TRUE(on.results.count(r.id) && off.results.count(r.id));
    const Result& a = on.results[r.id];
    const Result& b = off.results[r.id];
    ASSERT_TRUE(a.status.ok()) << a.status.ToString();
    ASSERT_EQ(a.choices.size(), b.choices.size());
    for (size_t c = 0; c < a.choices.size(); ++c)
      EXPECT_EQ(a.choices[c].text, b.choices[c].text) << "request " << r.id << " choice " << c;
    if (r.logprobs) {
      ASSERT_EQ(a.choices[0].logprobs.size(), b.choices[0].logprobs.size()) << "request " << r.id;
      for (size_t t = 0; t < a.choices[0].logprobs.size(); ++t)
        EXPECT_EQ(a.choices[0].logprobs[t].logprob, b.choices[0].logprobs[t].logprob) << "request " << r.id;
    }
  }
  // The three plain greedy requests' tokens, and only theirs, came from the device.
  // (A choice's tokens leave out an end-of-generation pick: up to one more each.)
  int64_t greedy_tokens = 0, greedy_requests = 0;
  for (const Request& r : reqs)
    if (r.n == 1 && !r.logprobs && r.sampling.temperature == 0.0f) {
      greedy_tokens += static_cast<int64_t>(on.results[r.id].choices[0].tokens.size());
      ++greedy_requests;
    }
  EXPECT_EQ(greedy_requests, 3);
  EXPECT_GE(on.stats.device_picks, greedy_tokens);
  EXPECT_LE(on.stats.device_picks, greedy_tokens + greedy_requests);
  EXPECT_EQ(off.stats.device_picks, 0);
  EXPECT_LT(on.stats.device_picks, on.stats.generated_tokens);
}

// A run of greedy requests alone: every token is picked on the device, and
// the answers are those of host sampling.
TEST_F(DeviceSampling, AllGreedyJobPicksEveryTokenOnTheDevice) {
  std::vector<Request> reqs;
  for (int i = 0; i < 6; ++i) reqs.push_back(RubricRequest(*model_, i, 16, 8, 0.0f));
  auto options = [](const char* mode) {
    EngineOptions o;
    o.context.deterministic = true;
    o.context.device_sampling = mode;
    o.context.n_threads = 2;
    return o;
  };
  EngineRun on = RunWithStats(*model_, reqs, options("on"));
  EngineRun off = RunWithStats(*model_, reqs, options("off"));
  for (const Request& r : reqs) EXPECT_EQ(on.results[r.id].tokens, off.results[r.id].tokens) << "request " << r.id;
  EXPECT_EQ(on.stats.device_picks, on.stats.generated_tokens);
  EXPECT_GT(on.stats.step_seconds, 0.0);
  EXPECT_GT(on.stats.decode_seconds, 0.0);
  EXPECT_LE(on.stats.decode_seconds, on.stats.step_seconds);
}

TEST(DeviceSamplingOptions, UnknownModeIsRefusedByName) {
  auto model = engine::Model::Load({TinyModel(), 0});
  ASSERT_TRUE(model.ok());
  EngineOptions o;
  o.context.device_sampling = "sometimes";
  auto eng = engine::Engine::Start(model->get(), o, [](Result&&) {});
  ASSERT_FALSE(eng.ok());
  EXPECT_NE(eng.status().ToString().find("sometimes"), std::string::npos);
}

}  // namespace
}  // namespace kvb::testing
