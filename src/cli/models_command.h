// `kvbatch models`: the models on this machine (GGUF files in Ollama's,
// Hugging Face's and LM Studio's stores), and the resolution of every
// command's -m (models/model_store.h).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "metrics/metrics.h"
#include "worker/model_router.h"

namespace kvb::cli {

// Lists them: name (what -m takes), architecture, quantisation, context,
// size and path. Exit code 0.
int ListModels(bool json);

// Turns -m's value into a file: `model` becomes the path, `name` the name
// requests know it by, `source` where it came from. On failure prints why
// and returns false.
bool ResolveModelFlag(std::string* model, std::string* name, std::string* source);

// What run, serve and worker load: the first -m (path, name and source as
// ResolveModelFlag gave them) and any further ones.
struct ModelFlags {
  std::string path;
  std::string name;  // empty: the file's stem
  std::string source = "path";
  std::vector<worker::ModelSpec> more;
  int32_t max_models = 0;  // --max-models
  int32_t n_gpu_layers = -1;
};

// The router over those models, the first one loaded now, each model's
// load failure explained (models::ExplainLoadFailure), each model's steps
// and results reported to `metrics` under its position.
StatusOr<std::unique_ptr<worker::ModelRouter>> StartModels(const ModelFlags& flags,
                                                           const engine::EngineOptions& engine,
                                                           metrics::Metrics* metrics);

}  // namespace kvb::cli
