#include "cli/estimate_command.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_map>

#include "batch/input_file.h"
#include "batch/prepare.h"
#include "batch/response.h"
#include "cli/progress.h"
#include "models/model_store.h"
#include "worker/engine_hub.h"

namespace kvb::cli {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

int Fail(const std::string& what) {
  std::fprintf(stderr, "kvbatch estimate: %s\n", what.c_str());
  return 1;
}

// A request group: the lines sharing a prefix hash (same system messages).
// Its first line is the reference the others are compared with.
struct Group {
  std::vector<engine::Token> reference;
  int64_t members = 0;
  int32_t shared = INT32_MAX;  // shortest common prefix of a member with the reference
};

// What tokenizing the file found.
struct Census {
  int64_t requests = 0;
  int64_t failed = 0;  // lines the engine would refuse (e.g. over the context)
  int64_t prompt_tokens = 0;
  int64_t unique_tokens = 0;   // prompt tokens beyond each line's prefix shared with its group
  int64_t max_new_tokens = 0;  // sum of max_tokens x n (those without a limit count as the context)
  std::unordered_map<uint64_t, Group> groups;
  std::vector<engine::Request> sample;  // the calibration requests, spread over the file
};

int32_t CommonPrefix(const std::vector<engine::Token>& a, const std::vector<engine::Token>& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return static_cast<int32_t>(i);
}

// Tokenizes every valid line (on every core: llama.cpp's tokenizer is
// thread-safe): the first line of each group first, as its reference.
StatusOr<Census> Tokenize(const std::string& path, const batch::InputScan& scan, const engine::Model& model,
                          int32_t default_max_tokens, int32_t n_ctx, size_t sample_size) {
  auto reader = batch::InputReader::Open(path);
  if (!reader.ok()) return reader.status();
  auto prepare = [&](const batch::InputLine& line) -> std::optional<engine::Request> {
    auto text = reader->ReadLine(line);
    if (!text.ok()) return std::nullopt;
    auto parsed = batch::ParseRequest(*text);
    if (!parsed.ok()) return std::nullopt;
    auto prepared = batch::PrepareRequest(std::move(parsed).value(), model, default_max_tokens, 0);
    if (std::holds_alternative<batch::RequestFailure>(prepared)) return std::nullopt;
    return std::get<engine::Request>(std::move(prepared));
  };

  Census c;
  for (const batch::InputLine& line : scan.valid) ++c.groups[line.prefix_hash].members;
  for (const batch::InputLine& line : scan.valid) {
    Group& g = c.groups[line.prefix_hash];
    if (g.members < 2 || !g.reference.empty()) continue;  // a group of one shares nothing
    if (auto r = prepare(line)) g.reference = std::move(r->prompt);
  }
  const size_t n = scan.valid.size();
  const size_t stride = std::max<size_t>(1, n / std::max<size_t>(1, sample_size));
  std::mutex mu;
  std::atomic<size_t> next{0};
  auto work = [&] {
    Census local;
    std::unordered_map<uint64_t, int32_t> shared;
    for (size_t i; (i = next.fetch_add(1)) < n;) {
      const batch::InputLine& line = scan.valid[i];
      auto r = prepare(line);
      if (!r || static_cast<int32_t>(r->prompt.size()) >= n_ctx) {
        ++local.failed;
        continue;
      }
      const Group& g = c.groups.at(line.prefix_hash);
      const int32_t len = static_cast<int32_t>(r->prompt.size());
      // A group of one shares nothing; the reference shares with the others.
      const int32_t common = g.members > 1 ? CommonPrefix(r->prompt, g.reference) : 0;
      if (g.members > 1) {
        auto [it, fresh] = shared.emplace(line.prefix_hash, common);
        if (!fresh) it->second = std::min(it->second, common);
      }
      ++local.requests;
      local.prompt_tokens += len;
      local.unique_tokens += len - common;
      const int32_t max_new = r->sampling.max_tokens > 0 ? r->sampling.max_tokens : n_ctx - len;
      local.max_new_tokens += static_cast<int64_t>(max_new) * std::max(1, r->n);
      if (i % stride == 0 && i / stride < sample_size) local.sample.push_back(std::move(*r));
    }
    std::lock_guard<std::mutex> lock(mu);
    c.requests += local.requests;
    c.failed += local.failed;
    c.prompt_tokens += local.prompt_tokens;
    c.unique_tokens += local.unique_tokens;
    c.max_new_tokens += local.max_new_tokens;
    for (auto& r : local.sample) c.sample.push_back(std::move(r));
    for (const auto& [hash, s] : shared) {
      Group& g = c.groups.at(hash);
      g.shared = std::min(g.shared, s);
    }
  };
  std::vector<std::thread> threads;
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned t = 0; t < cores; ++t) threads.emplace_back(work);
  for (auto& t : threads) t.join();
  // Shared prefixes are computed once per group.
  for (auto& [hash, g] : c.groups)
    if (g.members > 1 && g.shared != INT32_MAX) c.unique_tokens += g.shared;
  return c;
}

// One calibration pass: the requests through the engine, all queued at once.
struct Pass {
  double seconds = 0;
  int64_t requests = 0;
  int64_t prefill_tokens = 0;  // prompt tokens the engine computed
  int64_t cached_tokens = 0;
  int64_t generated = 0;
};

Pass RunPass(worker::EngineHub& hub, std::vector<engine::Request> requests) {
  struct Wait {
    std::mutex mu;
    std::condition_variable cv;
    size_t left = 0;
  };
  auto wait = std::make_shared<Wait>();
  wait->left = requests.size();
  const engine::EngineStats before = hub.Stats();
  std::vector<std::pair<engine::Request, worker::RequestCallbacks>> batch;
  for (auto& r : requests) {
    r.id = hub.NextId();
    r.submitted_ns = 0;
    worker::RequestCallbacks cb;
    cb.on_result = [wait](engine::Result&&) {
      std::lock_guard<std::mutex> lock(wait->mu);
      if (--wait->left == 0) wait->cv.notify_all();
    };
    batch.emplace_back(std::move(r), std::move(cb));
  }
  const auto start = Clock::now();
  hub.SubmitAll(std::move(batch));
  {
    std::unique_lock<std::mutex> lock(wait->mu);
    wait->cv.wait(lock, [&] { return wait->left == 0; });
  }
  Pass p;
  p.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  // The engine publishes its stats after the step that delivered the results.
  engine::EngineStats after = hub.Stats();
  for (int i = 0; i < 100 && after.requests_done + after.requests_failed - before.requests_done -
                                      before.requests_failed < static_cast<int64_t>(requests.size());
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    after = hub.Stats();
  }
  p.requests = static_cast<int64_t>(requests.size());
  p.prefill_tokens = after.prefill_tokens - before.prefill_tokens;
  p.cached_tokens = after.cached_tokens - before.cached_tokens;
  p.generated = after.completion_tokens - before.completion_tokens;
  return p;
}

std::string Bytes(double b) {
  char buf[32];
  if (b >= (1 << 30)) std::snprintf(buf, sizeof buf, "%.1f GiB", b / (1 << 30));
  else if (b >= (1 << 20)) std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1 << 20));
  else std::snprintf(buf, sizeof buf, "%.0f KiB", b / 1024);
  return buf;
}

}  // namespace

int Estimate(const EstimateOptions& o) {
  const auto t0 = Clock::now();
  auto scan = batch::ScanInputFile(o.input);
  if (!scan.ok()) return Fail(scan.status().message());
  if (scan->valid.empty()) {
    std::fprintf(stderr, "kvbatch estimate: no valid request in %s (%zu invalid line(s))\n", o.input.c_str(),
                 scan->errors.size());
    return 2;
  }
  if (std::error_code ec; !std::filesystem::is_regular_file(o.model, ec)) return Fail("model not found: " + o.model);
  auto model = engine::Model::Load({o.model, o.n_gpu_layers, "", o.model_name});
  if (!model.ok())
    return Fail(models::ExplainLoadFailure({o.model_name, o.model, o.model_source}, model.status().message()));
  auto started = worker::EngineHub::Start(model->get(), o.engine);
  if (!started.ok()) return Fail(started.status().message());
  std::unique_ptr<worker::EngineHub> hub = std::move(started).value();
  const engine::ContextInfo& info = hub->info();

  const size_t sample_size = o.sample > 0 ? static_cast<size_t>(o.sample) : static_cast<size_t>(2 * info.max_seqs);
  auto census = Tokenize(o.input, *scan, **model, o.default_max_tokens, info.n_ctx_seq, sample_size);
  if (!census.ok()) return Fail(census.status().message());
  Census& c = *census;
  if (c.requests == 0) return Fail("no line of " + o.input + " can run on this model");
  const double tokenize_s = std::chrono::duration<double>(Clock::now() - t0).count();

  // Calibration. Pass A: the sample's prompts alone (one token each): the
  // prefill rate, shared prefixes included. Pass B: the sample as written,
  // its shared prefixes now resident, as they are for all but the first
  // requests of a real run: the steady rate of everything else.
  std::vector<engine::Request> prefill_only = c.sample;
  for (auto& r : prefill_only) {
    r.sampling.max_tokens = 1;
    r.n = 1;
  }
  const Pass a = RunPass(*hub, std::move(prefill_only));
  const Pass b = RunPass(*hub, c.sample);
  const double calibration_s = a.seconds + b.seconds;
  const double prefill_rate = a.prefill_tokens > 0 ? a.prefill_tokens / a.seconds : 0;  // tokens/s
  const double steady_rate = b.seconds > 0 ? b.requests / b.seconds : 0;                // requests/s

  int64_t shared_once = 0, shared_groups = 0, largest_prefix = 0;
  for (const auto& [hash, g] : c.groups) {
    if (g.members < 2 || g.shared == INT32_MAX || g.shared == 0) continue;
    ++shared_groups;
    shared_once += g.shared;
    largest_prefix = std::max<int64_t>(largest_prefix, g.shared);
  }
  const double projected = (prefill_rate > 0 ? shared_once / prefill_rate : 0) +
                           (steady_rate > 0 ? static_cast<double>(c.requests) / steady_rate : 0);
  const double generated_per_request = b.requests > 0 ? static_cast<double>(b.generated) / b.requests : 0;

  // KV: a parallel sequence holds its own tokens (prompt beyond the shared
  // prefix, and what it generates); the shared prefix is held once.
  const double bytes_per_cell = info.kv_cells > 0 ? static_cast<double>(info.kv_bytes) / info.kv_cells : 0;
  // Admission reserves a sequence's worst case: its own prompt and max_tokens.
  const double cells_per_seq = static_cast<double>(c.unique_tokens - shared_once) / c.requests +
                               static_cast<double>(c.max_new_tokens) / c.requests;
  const double per_seq = std::max(1.0, cells_per_seq);
  const int64_t fits = static_cast<int64_t>(std::max(0.0, (info.kv_cells - largest_prefix) / per_seq));
  size_t mem_free = 0, mem_total = 0;
  hub->DeviceMemory(&mem_free, &mem_total);

  json out = {
      {"input", o.input},
      {"model", (*model)->name()},
      {"device", info.device},
      {"requests", c.requests},
      {"invalid_lines", scan->errors.size()},
      {"unrunnable_lines", c.failed},
      {"prompt_tokens", c.prompt_tokens},
      {"prompt_tokens_to_compute", c.unique_tokens},
      {"prompt_tokens_saved_ratio", c.prompt_tokens > 0 ? 1.0 - static_cast<double>(c.unique_tokens) / c.prompt_tokens : 0},
      {"shared_prefixes", shared_groups},
      {"shared_prefix_tokens", shared_once},
      {"max_new_tokens", c.max_new_tokens},
      {"generated_tokens_projected", static_cast<int64_t>(generated_per_request * c.requests)},
      {"kv_bytes_per_token", bytes_per_cell},
      {"kv_bytes_per_sequence", bytes_per_cell * per_seq},
      {"kv_cells", info.kv_cells},
      {"kv_bytes", info.kv_bytes},
      {"parallel_sequences", info.max_seqs},
      {"parallel_sequences_fit", fits},
      {"device_memory_total", mem_total},
      {"device_memory_free", mem_free},
      {"calibration",
       {{"requests", b.requests},
        {"seconds", calibration_s},
        {"tokenize_seconds", tokenize_s},
        {"prefill_tokens_per_second", prefill_rate},
        {"requests_per_second", steady_rate},
        {"generated_tokens_per_request", generated_per_request}}},
      {"projected_seconds", projected},
      {"projected_requests_per_second", projected > 0 ? c.requests / projected : 0},
  };
  if (o.watts > 0) out["energy_kwh"] = o.watts * projected / 3.6e6;
  if (o.cost_per_hour > 0) out["cost"] = o.cost_per_hour * projected / 3600;
  if (o.json) {
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  auto pct = [](double x) { return 100.0 * x; };
  std::printf("kvbatch estimate: %s on %s (%s)\n", o.input.c_str(), (*model)->name().c_str(), info.device.c_str());
  std::printf("  requests        %lld valid", static_cast<long long>(c.requests));
  if (!scan->errors.empty()) std::printf(", %zu invalid (not counted)", scan->errors.size());
  if (c.failed > 0) std::printf(", %lld too long for the context", static_cast<long long>(c.failed));
  std::printf("\n  prompt tokens   %lld in all, %lld to compute after prefix sharing (%.1f%% saved)\n",
              static_cast<long long>(c.prompt_tokens), static_cast<long long>(c.unique_tokens),
              pct(out["prompt_tokens_saved_ratio"].get<double>()));
  std::printf("  shared prefixes %lld (%lld tokens, each computed once; the longest %lld)\n",
              static_cast<long long>(shared_groups), static_cast<long long>(shared_once),
              static_cast<long long>(largest_prefix));
  std::printf("  generation      %.0f tokens per request measured (max_tokens allow %.0f), %lld in all\n",
              generated_per_request, static_cast<double>(c.max_new_tokens) / c.requests,
              static_cast<long long>(generated_per_request * c.requests));
  std::printf("  KV cache        %s per token, %s per parallel sequence; %d cells (%s) fit %lld sequences "
              "beside the longest prefix; the engine runs %d\n",
              Bytes(bytes_per_cell).c_str(), Bytes(bytes_per_cell * per_seq).c_str(), info.kv_cells,
              Bytes(static_cast<double>(info.kv_bytes)).c_str(), static_cast<long long>(fits), info.max_seqs);
  if (mem_total > 0)
    std::printf("  device memory   %s free of %s\n", Bytes(static_cast<double>(mem_free)).c_str(),
                Bytes(static_cast<double>(mem_total)).c_str());
  std::printf("  calibration     %lld requests in %.1f s: prefill %.0f tokens/s, %.2f requests/s with prefixes "
              "resident\n",
              static_cast<long long>(b.requests), calibration_s, prefill_rate, steady_rate);
  std::printf("  projected       %s (%.0f s), %.2f requests/s\n", HumanDuration(projected).c_str(), projected,
              out["projected_requests_per_second"].get<double>());
  if (out.contains("energy_kwh")) std::printf("  energy          %.3f kWh at %.0f W\n", out["energy_kwh"].get<double>(), o.watts);
  if (out.contains("cost")) std::printf("  cost            %.2f at %.2f per hour\n", out["cost"].get<double>(), o.cost_per_hour);
  return 0;
}

}  // namespace kvb::cli
