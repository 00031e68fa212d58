#include "engine/embedder.h"

#include <algorithm>
#include <cmath>

#include "llama.h"

namespace kvb::engine {

namespace {

// Inputs per call and tokens per call: many inputs share one decode. The
// inputs of a call attend over all of its tokens (masked), so on the CPU a
// call is kept to 256 tokens (or one longer input) to bound that waste:
// 1,000 bge-small-shaped inputs (12-48 words) took 41.8 s in calls of 2,048
// tokens, 30.0 s of 512, 25.6 s of 256, 28.0 s of 128 (2 cores). A GPU
// takes larger calls (launch overhead costs more there than the waste).
constexpr int32_t kSeqMax = 64;
constexpr int32_t kBatchTokens = 8192;
constexpr int32_t kCallTokensCpu = 256;
constexpr int32_t kCallTokensGpu = 2048;

}  // namespace

StatusOr<std::unique_ptr<Embedder>> Embedder::Start(const Model* model, const ContextOptions& o,
                                                    std::function<void(Result&&)> on_result,
                                                    std::function<void(const std::vector<uint64_t>&)> on_start) {
  std::unique_ptr<Embedder> e(new Embedder);
  e->model_ = model;
  e->on_result_ = std::move(on_result);
  e->on_start_ = std::move(on_start);
  llama_model* raw = model->raw();
  e->encoder_only_ = llama_model_has_encoder(raw) && !llama_model_has_decoder(raw);
  // An input must fit one micro-batch (non-causal models attend to all of
  // it at once): the batch is as long as the model's context, up to 8192.
  const int32_t n_ctx = std::clamp(model->n_ctx_train(), 512, kBatchTokens);
  llama_context_params cp = llama_context_default_params();
  cp.embeddings = true;
  cp.n_ctx = static_cast<uint32_t>(n_ctx);
  cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(n_ctx);
  cp.n_seq_max = kSeqMax;
  cp.kv_unified = true;
  const int32_t threads =
      o.n_threads > 0 ? o.n_threads : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
  cp.n_threads = cp.n_threads_batch = threads;
  cp.no_perf = true;
  if (o.pooling == "mean") cp.pooling_type = LLAMA_POOLING_TYPE_MEAN;
  else if (o.pooling == "last") cp.pooling_type = LLAMA_POOLING_TYPE_LAST;
  else if (o.pooling == "cls") cp.pooling_type = LLAMA_POOLING_TYPE_CLS;
  else if (!o.pooling.empty()) return Status::InvalidArgument("--pooling must be mean, last or cls, not " + o.pooling);
  e->ctx_ = llama_init_from_model(raw, cp);
  if (e->ctx_ != nullptr && llama_pooling_type(e->ctx_) == LLAMA_POOLING_TYPE_NONE) {
    // A decoder that declares no pooling: its last token's state (how
    // Qwen3-Embedding-style models embed).
    llama_free(e->ctx_);
    cp.pooling_type = LLAMA_POOLING_TYPE_LAST;
    e->ctx_ = llama_init_from_model(raw, cp);
  }
  if (e->ctx_ == nullptr) return Status::Internal("llama.cpp could not create an embeddings context");
  switch (llama_pooling_type(e->ctx_)) {
    case LLAMA_POOLING_TYPE_MEAN: e->pooling_name_ = "mean"; break;
    case LLAMA_POOLING_TYPE_CLS: e->pooling_name_ = "cls"; break;
    case LLAMA_POOLING_TYPE_LAST: e->pooling_name_ = "last"; break;
    default: e->pooling_name_ = "other"; break;
  }
  e->n_embd_ = llama_model_n_embd(raw);
  e->n_batch_ = n_ctx;  // the longest input
  e->n_call_ = model->gpu() != nullptr ? kCallTokensGpu : kCallTokensCpu;
  e->n_seq_max_ = kSeqMax;
  e->thread_ = std::thread([raw_e = e.get()] { raw_e->Loop(); });
  return e;
}

Embedder::~Embedder() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (ctx_ != nullptr) llama_free(ctx_);
}

void Embedder::Submit(Request request) {
  if (request.submitted_ns == 0) request.submitted_ns = SteadyNowNs();
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(request));
  }
  cv_.notify_all();
}

void Embedder::Cancel(uint64_t id) {
  Request cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find_if(queue_.begin(), queue_.end(), [id](const Request& r) { return r.id == id; });
    if (it == queue_.end()) return;  // running or done: it finishes
    cancelled = std::move(*it);
    queue_.erase(it);
  }
  Result r;
  r.id = id;
  r.status = Status::Cancelled("the request was cancelled");
  on_result_(std::move(r));
}

// Takes whole requests from the queue while their inputs fit one call (a
// request with more inputs than that runs over several calls alone).
void Embedder::Loop() {
  for (;;) {
    std::vector<Request> take;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      int32_t tokens = 0, inputs = 0;
      while (!queue_.empty()) {
        const Request& r = queue_.front();
        int32_t t = 0;
        for (const auto& in : r.embed) t += static_cast<int32_t>(in.size());
        const int32_t n = static_cast<int32_t>(r.embed.size());
        if (!take.empty() && (tokens + t > 4 * n_call_ || inputs + n > 4 * n_seq_max_)) break;
        tokens += t;
        inputs += n;
        take.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    std::vector<uint64_t> ids;
    for (const auto& r : take) ids.push_back(r.id);
    if (on_start_) on_start_(ids);
    std::vector<Result> results(take.size());
    std::vector<Slot> pending;  // inputs not yet embedded
    for (size_t i = 0; i < take.size(); ++i) {
      results[i].id = take[i].id;
      results[i].embed_base64 = take[i].embed_base64;
      results[i].embeddings.resize(take[i].embed.size());
      for (size_t k = 0; k < take[i].embed.size(); ++k) {
        const int32_t len = static_cast<int32_t>(take[i].embed[k].size());
        results[i].prompt_tokens += len;
        if (len == 0 || len > n_batch_)
          results[i].status = Status::ResourceExhausted(
              "input " + std::to_string(k) + " has " + std::to_string(len) + " tokens; this model embeds 1 to " +
              std::to_string(n_batch_));
        else
          pending.push_back({i, k});
      }
    }
    // In calls of at most n_seq_max_ inputs and n_call_ tokens (a longer input alone).
    std::vector<Slot> call;
    int32_t tokens = 0;
    auto flush = [&] {
      if (call.empty()) return;
      if (Status st = Decode(call, take, results); !st.ok())
        for (const Slot& slot : call)
          if (results[slot.request].status.ok()) results[slot.request].status = st;
      call.clear();
      tokens = 0;
    };
    for (const Slot& p : pending) {
      const int32_t len = static_cast<int32_t>(take[p.request].embed[p.input].size());
      if (!call.empty() && (static_cast<int32_t>(call.size()) == n_seq_max_ || tokens + len > n_call_)) flush();
      call.push_back(p);
      tokens += len;
    }
    flush();
    for (size_t i = 0; i < take.size(); ++i) {
      Result& r = results[i];
      if (!r.status.ok()) r.embeddings.clear();
      r.timing.total = static_cast<double>(SteadyNowNs() - take[i].submitted_ns) * 1e-9;
      on_result_(std::move(r));
    }
  }
}

Status Embedder::Decode(const std::vector<Slot>& inputs, const std::vector<Request>& requests,
                        std::vector<Result>& results) {
  int32_t n_tokens = 0;
  for (const Slot& in : inputs) n_tokens += static_cast<int32_t>(requests[in.request].embed[in.input].size());
  llama_batch batch = llama_batch_init(n_tokens, 0, 1);
  for (size_t s = 0; s < inputs.size(); ++s) {
    const std::vector<Token>& in = requests[inputs[s].request].embed[inputs[s].input];
    for (size_t p = 0; p < in.size(); ++p) {
      const int32_t i = batch.n_tokens++;
      batch.token[i] = in[p];
      batch.pos[i] = static_cast<llama_pos>(p);
      batch.n_seq_id[i] = 1;
      batch.seq_id[i][0] = static_cast<llama_seq_id>(s);
      batch.logits[i] = true;
    }
  }
  if (llama_memory_t mem = llama_get_memory(ctx_)) llama_memory_clear(mem, true);
  const int rc = encoder_only_ ? llama_encode(ctx_, batch) : llama_decode(ctx_, batch);
  llama_batch_free(batch);
  if (rc != 0) return Status::Internal("llama.cpp failed to embed the inputs (code " + std::to_string(rc) + ")");
  for (size_t s = 0; s < inputs.size(); ++s) {
    const float* v = llama_get_embeddings_seq(ctx_, static_cast<llama_seq_id>(s));
    if (v == nullptr) return Status::Internal("llama.cpp returned no pooled embedding");
    double norm = 0;
    for (int32_t d = 0; d < n_embd_; ++d) norm += static_cast<double>(v[d]) * v[d];
    const float scale = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
    std::vector<float> out(v, v + n_embd_);
    for (float& x : out) x *= scale;  // unit length, as OpenAI's
    results[inputs[s].request].embeddings[inputs[s].input] = std::move(out);
  }
  return Status::Ok();
}

}  // namespace kvb::engine
