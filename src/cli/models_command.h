// `kvbatch models`: the models on this machine (GGUF files in Ollama's,
// Hugging Face's and LM Studio's stores), and the resolution of every
// command's -m (models/model_store.h).
#pragma once

#include <string>

namespace kvb::cli {

// Lists them: name (what -m takes), architecture, quantisation, context,
// size and path. Exit code 0.
int ListModels(bool json);

// Turns -m's value into a file: `model` becomes the path, `name` the name
// requests know it by, `source` where it came from. On failure prints why
// and returns false.
bool ResolveModelFlag(std::string* model, std::string* name, std::string* source);

}  // namespace kvb::cli
