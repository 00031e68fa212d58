#include "cli/models_command.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "models/model_store.h"

namespace kvb::cli {

int ListModels(bool json) {
  const models::StoreDirs dirs = models::StoreDirs::FromEnvironment();
  nlohmann::json list = nlohmann::json::array();
  for (const models::ModelRef& m : models::ListAll(dirs)) {
    nlohmann::json row = {{"name", m.name}, {"path", m.path}, {"source", m.source}};
    if (auto info = models::ReadGgufInfo(m.path); info.ok()) {
      row["architecture"] = info->architecture;
      row["quantization"] = info->quantization;
      row["context_length"] = info->context_length;
      row["bytes"] = info->bytes;
      row["vision_tensors"] = info->vision;
    } else {
      row["error"] = info.status().message();
    }
    list.push_back(std::move(row));
  }
  if (json) {
    std::printf("%s\n", list.dump(2).c_str());
    return 0;
  }
  if (list.empty()) {
    std::printf("No models found in Ollama's store (%s), a Hugging Face cache or LM Studio's store.\n"
                "Give -m a GGUF path, or see `kvbatch run --help`.\n",
                dirs.ollama.c_str());
    return 0;
  }
  std::printf("%-44s %-12s %-8s %8s %9s  %s\n", "NAME", "ARCH", "QUANT", "CONTEXT", "SIZE", "PATH");
  for (const auto& r : list) {
    if (r.contains("error")) {
      std::printf("%-44s %s  %s\n", r["name"].get<std::string>().c_str(), r["error"].get<std::string>().c_str(),
                  r["path"].get<std::string>().c_str());
      continue;
    }
    std::printf("%-44s %-12s %-8s %8lld %7.1f GB  %s%s\n", r["name"].get<std::string>().c_str(),
                r["architecture"].get<std::string>().c_str(), r["quantization"].get<std::string>().c_str(),
                static_cast<long long>(r["context_length"].get<int64_t>()),
                static_cast<double>(r["bytes"].get<int64_t>()) / 1e9, r["path"].get<std::string>().c_str(),
                r["vision_tensors"].get<bool>() ? "  (vision tensors)" : "");
  }
  return 0;
}

bool ResolveModelFlag(std::string* model, std::string* name, std::string* source) {
  auto ref = models::Resolve(*model, models::StoreDirs::FromEnvironment());
  if (!ref.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", ref.status().message().c_str());
    return false;
  }
  *model = ref->path;
  *name = ref->name;
  *source = ref->source;
  return true;
}

StatusOr<std::unique_ptr<worker::ModelRouter>> StartModels(const ModelFlags& flags,
                                                           const engine::EngineOptions& engine,
                                                           metrics::Metrics* metrics) {
  std::vector<worker::ModelSpec> specs{
      {flags.name.empty() ? std::filesystem::path(flags.path).stem().string() : flags.name, flags.path, flags.source}};
  specs.insert(specs.end(), flags.more.begin(), flags.more.end());
  worker::RouterOptions ro;
  ro.n_gpu_layers = flags.n_gpu_layers;
  ro.engine = engine;
  ro.max_loaded = flags.max_models;
  ro.on_step = [metrics](int index, const engine::StepInfo& step) { metrics->ObserveStep(index, step); };
  ro.observe = [metrics](int index, const engine::Result& r) { metrics->ObserveResult(index, r); };
  // Every model's load failure, the first one's at start and the others' in
  // their requests' answers, says why an Ollama blob may not load.
  ro.explain_load_failure = [](const worker::ModelSpec& spec, const std::string& failure) {
    return models::ExplainLoadFailure({spec.name, spec.path, spec.source}, failure);
  };
  return worker::ModelRouter::Start(specs, ro);
}

}  // namespace kvb::cli
