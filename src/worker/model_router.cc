#include "worker/model_router.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/llama_backend.h"
#include "ggml-backend.h"

namespace kvb::worker {

// A model and its engine; the engine goes first.
struct ModelRouter::Loaded {
  std::unique_ptr<engine::Model> model;
  std::shared_ptr<EngineHub> hub;
  ~Loaded() { hub.reset(); }
};

namespace {

// into += s: the counters; the gauges too with `gauges`.
void AddStats(engine::EngineStats& into, const engine::EngineStats& s, bool gauges) {
  into.requests_done += s.requests_done;
  into.requests_failed += s.requests_failed;
  into.prompt_tokens += s.prompt_tokens;
  into.cached_tokens += s.cached_tokens;
  into.prefill_tokens += s.prefill_tokens;
  into.device_picks += s.device_picks;
  into.step_seconds += s.step_seconds;
  into.decode_seconds += s.decode_seconds;
  into.completion_tokens += s.completion_tokens;
  into.generated_tokens += s.generated_tokens;
  into.steps += s.steps;
  into.requeued += s.requeued;
  into.failed_steps += s.failed_steps;
  into.cells_peak = std::max(into.cells_peak, s.cells_peak);
  if (!gauges) return;
  into.active += s.active;
  into.waiting += s.waiting;
  into.anchors += s.anchors;
  into.cells_used += s.cells_used;
  into.cells_reserved += s.cells_reserved;
  into.cells_total += s.cells_total;
}

uint64_t DefaultFreeMemory() {
  for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_GPU) continue;
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    return free;
  }
  return engine::AvailableRam();
}

}  // namespace

StatusOr<std::unique_ptr<ModelRouter>> ModelRouter::Start(std::vector<ModelSpec> specs, RouterOptions options) {
  if (specs.empty()) return Status::InvalidArgument("no model");
  for (size_t i = 0; i < specs.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (specs[i].name == specs[j].name)
        return Status::InvalidArgument("two models are called '" + specs[i].name +
                                       "': give each -m a different file or name");
  std::unique_ptr<ModelRouter> r(new ModelRouter());
  r->specs_ = std::move(specs);
  r->options_ = std::move(options);
  if (!r->options_.free_memory) r->options_.free_memory = DefaultFreeMemory;
  r->loaded_.resize(r->specs_.size());
  r->last_use_.assign(r->specs_.size(), 0);
  std::unique_lock<std::mutex> lock(r->mu_);
  if (Status st = r->LoadLocked(0, lock, true); !st.ok()) return st;
  r->max_seqs_ = r->loaded_[0]->hub->max_seqs();
  lock.unlock();
  return r;
}

ModelRouter::~ModelRouter() {
  // The engines stop outside the lock: an engine thread delivering a result
  // takes it (SubmitAll's callback), and stopping joins that thread. Under
  // the lock, an interrupted run deadlocked here.
  std::vector<std::shared_ptr<Loaded>> loaded;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& l : loaded_) loaded.push_back(std::move(l));  // loaded_ keeps its size, all null
  }
  loaded.clear();
}

std::string ModelRouter::Names() const {
  std::string names;
  for (const auto& s : specs_) names += (names.empty() ? "" : ", ") + s.name;
  return names;
}

int ModelRouter::Find(const std::string& model) const {
  if (specs_.size() == 1) return 0;
  for (size_t i = 0; i < specs_.size(); ++i)
    if (specs_[i].name == model) return static_cast<int>(i);
  return -1;
}

bool ModelRouter::Fits(const ModelSpec& spec) const {
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(spec.path, ec);
  if (ec) return true;  // Model::Load will say what is wrong
  // The weights and a margin for the engine's KV cache and buffers.
  return options_.free_memory() >= size + size / 4 + (uint64_t{256} << 20);
}

Status ModelRouter::LoadLocked(int index, std::unique_lock<std::mutex>& lock, bool wait) {
  // One load at a time; others wait for it (they may want the same model).
  idle_cv_.wait(lock, [&] { return !loading_; });
  if (loaded_[index]) return Status::Ok();
  auto count = [&] {
    int n = 0;
    for (const auto& l : loaded_) n += l != nullptr;
    return n;
  };
  for (;;) {
    const bool over_count = options_.max_loaded > 0 && count() >= options_.max_loaded;
    if (!over_count && (count() == 0 || Fits(specs_[index]))) break;
    // The least recently used model with nothing in flight and nobody holding it.
    int victim = -1;
    bool busy = false;
    std::vector<int> routed(loaded_.size(), 0);  // prepared, maybe not yet submitted
    for (const auto& [id, i] : routes_) ++routed[static_cast<size_t>(i)];
    for (size_t i = 0; i < loaded_.size(); ++i) {
      if (!loaded_[i]) continue;
      if (loaded_[i]->hub.use_count() > 1 || loaded_[i]->hub->pending() > 0 || routed[i] > 0) {
        busy = true;
        continue;
      }
      if (victim < 0 || last_use_[i] < last_use_[static_cast<size_t>(victim)]) victim = static_cast<int>(i);
    }
    if (victim >= 0) {
      std::fprintf(stderr, "kvbatch: unloading model %s to make room for %s\n", specs_[victim].name.c_str(),
                   specs_[index].name.c_str());
      std::shared_ptr<Loaded> gone = std::move(loaded_[victim]);
      lock.unlock();
      gone->hub->StopEngine();  // idle: nothing is lost; its counters are final after
      lock.lock();
      AddStats(retired_, gone->hub->Stats(), false);
      lock.unlock();
      gone.reset();  // stops its engine and frees its memory, outside the lock
      lock.lock();
      unloads_.fetch_add(1);
      continue;
    }
    if (!busy) break;  // nothing to unload: try anyway, llama.cpp says if it does not fit
    if (!wait) return Status::Unavailable("every loaded model is busy");  // the only Unavailable: see AcquireAt
    // Every loaded model is working: wait for one to finish (its requests
    // complete on their own engine threads).
    idle_cv_.wait_for(lock, std::chrono::milliseconds(50));
  }
  loading_ = true;
  lock.unlock();
  const ModelSpec& spec = specs_[index];
  auto model = engine::Model::Load({spec.path, options_.n_gpu_layers, "", spec.name});
  StatusOr<std::unique_ptr<EngineHub>> hub = Status::Internal("not started");
  if (model.ok()) {
    engine::EngineOptions eo = options_.engine;
    if (options_.on_step) eo.on_step = [f = options_.on_step, index](const engine::StepInfo& s) { f(index, s); };
    std::function<void(const engine::Result&)> observe;
    if (options_.observe) observe = [f = options_.observe, index](const engine::Result& r) { f(index, r); };
    hub = EngineHub::Start(model->get(), eo, observe);
  }
  lock.lock();
  loading_ = false;
  idle_cv_.notify_all();
  if (!model.ok() && options_.explain_load_failure)
    return Status(model.status().code(), options_.explain_load_failure(spec, model.status().message()));
  if (!model.ok()) return model.status();
  if (!hub.ok()) return hub.status();
  auto l = std::make_shared<Loaded>();
  l->model = std::move(model).value();
  l->hub = std::shared_ptr<EngineHub>(std::move(hub).value());
  l->hub->ShareIds(ids_);
  if (admit_flush_) l->hub->SetAdmitFlush(admit_flush_);
  loaded_[index] = std::move(l);
  loads_.fetch_add(1);
  if (index != 0 || loads_.load() > 1)
    std::fprintf(stderr, "kvbatch: loaded model %s (%s)\n", spec.name.c_str(), loaded_[index]->hub->info().device.c_str());
  return Status::Ok();
}

std::variant<std::shared_ptr<EngineHub>, batch::RequestFailure> ModelRouter::Acquire(const std::string& model,
                                                                                     bool wait) {
  return AcquireAt(Find(model), model, wait);
}

std::variant<std::shared_ptr<EngineHub>, batch::RequestFailure> ModelRouter::AcquireAt(int index,
                                                                                       const std::string& model,
                                                                                       bool wait) {
  if (index < 0)
    return batch::RequestFailure{
        404, "model_not_found", "The model '" + model + "' does not exist on this server (it serves " + Names() + ").",
        "model"};
  std::unique_lock<std::mutex> lock(mu_);
  last_use_[index] = ++uses_;
  if (!loaded_[index]) {
    Status st = LoadLocked(index, lock, wait);
    if (st.code() == StatusCode::kUnavailable) return batch::RequestFailure{503, kModelBusy, st.message(), "model"};
    if (!st.ok()) return batch::RequestFailure{503, "model_not_loaded", st.message(), "model"};
  }
  return loaded_[index]->hub;
}

std::variant<engine::Request, batch::RequestFailure> ModelRouter::Prepare(batch::ParsedRequest&& request,
                                                                         int32_t default_max_tokens) {
  // The batch runner must not block here (it renews its leases): a model
  // that has to wait for another to go idle is offered again later.
  const int index = Find(request.model);
  auto hub = AcquireAt(index, request.model, /*wait=*/false);
  if (auto* f = std::get_if<batch::RequestFailure>(&hub)) return std::move(*f);
  auto prepared = std::get<std::shared_ptr<EngineHub>>(hub)->Prepare(std::move(request), default_max_tokens);
  if (auto* r = std::get_if<engine::Request>(&prepared)) {
    std::lock_guard<std::mutex> lock(mu_);
    routes_[r->id] = index;
  }
  return prepared;
}

void ModelRouter::SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests) {
  std::vector<std::vector<std::pair<engine::Request, RequestCallbacks>>> by_model(specs_.size());
  std::vector<std::shared_ptr<EngineHub>> hubs(specs_.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& item : requests) {
      auto it = routes_.find(item.first.id);
      const int index = it == routes_.end() ? 0 : it->second;
      // Leaving the router's table as the answer comes lets the model unload.
      auto done = std::move(item.second.on_result);
      item.second.on_result = [this, id = item.first.id, done = std::move(done)](engine::Result&& r) {
        {
          std::lock_guard<std::mutex> l(mu_);
          routes_.erase(id);
        }
        idle_cv_.notify_all();
        if (done) done(std::move(r));
      };
      by_model[index].push_back(std::move(item));
      if (!hubs[index] && loaded_[index]) hubs[index] = loaded_[index]->hub;
    }
  }
  for (size_t i = 0; i < by_model.size(); ++i) {
    if (by_model[i].empty()) continue;
    if (!hubs[i]) {
      // Unloaded between Prepare and here (cannot happen while its requests
      // are routed: a model with routed requests is busy); answer them.
      for (auto& [r, cb] : by_model[i]) {
        engine::Result res;
        res.id = r.id;
        res.status = Status::Unavailable("model " + specs_[i].name + " was unloaded");
        if (cb.on_result) cb.on_result(std::move(res));
      }
      continue;
    }
    hubs[i]->SubmitAll(std::move(by_model[i]));
  }
}

void ModelRouter::Cancel(uint64_t id) {
  std::shared_ptr<EngineHub> hub;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routes_.find(id);
    if (it == routes_.end() || !loaded_[it->second]) return;
    hub = loaded_[it->second]->hub;
  }
  hub->Cancel(id);
}

void ModelRouter::SetAdmitFlush(std::function<void()> flush) {
  std::lock_guard<std::mutex> lock(mu_);
  admit_flush_ = flush;
  for (auto& l : loaded_)
    if (l) l->hub->SetAdmitFlush(flush);
}

std::string ModelRouter::ModelOf(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routes_.find(id);
  return it == routes_.end() ? specs_.front().name : specs_[it->second].name;
}

engine::EngineStats ModelRouter::Stats() {
  std::lock_guard<std::mutex> lock(mu_);
  engine::EngineStats s = retired_;
  for (const auto& l : loaded_)
    if (l) AddStats(s, l->hub->Stats(), true);
  return s;
}

std::shared_ptr<EngineHub> ModelRouter::LoadedHub(int index) {
  std::lock_guard<std::mutex> lock(mu_);
  if (index < 0 || static_cast<size_t>(index) >= loaded_.size() || !loaded_[index]) return nullptr;
  return loaded_[index]->hub;
}

}  // namespace kvb::worker
