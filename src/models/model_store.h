// Models by name: `-m` takes a GGUF path, or a model already on disk in
// another tool's store, found without any network:
//   ollama:NAME[:TAG]        Ollama's store ($OLLAMA_MODELS, default ~/.ollama/models):
//                            manifests/<host>/<namespace>/<model>/<tag> -> the layer of media type
//                            application/vnd.ollama.image.model -> blobs/sha256-<hex> (a plain GGUF).
//                            A bare NAME:TAG (no such path) is tried as an Ollama name too.
//   hf:ORG/REPO[:FILE|QUANT] a Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)
//                            and llama.cpp's ($LLAMA_CACHE, ~/.cache/llama.cpp): models--ORG--REPO/
//                            refs/main -> snapshots/<rev>/<file>.gguf
//   lmstudio:PUB/MODEL[:FILE|QUANT]  LM Studio's store ($LMSTUDIO_MODELS, ~/.lmstudio/models,
//                            ~/.cache/lm-studio/models): <publisher>/<model>/<file>.gguf
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace kvb::models {

// Where the stores are (from the environment, or set by tests).
struct StoreDirs {
  std::string ollama;                 // the models directory (holds manifests/ and blobs/)
  std::vector<std::string> hf;        // hub cache directories (hold models--ORG--REPO/)
  std::vector<std::string> lmstudio;  // models directories (hold PUBLISHER/MODEL/)
  static StoreDirs FromEnvironment();
};

struct ModelRef {
  std::string name;    // as the user gave it (a path's file stem for a path)
  std::string path;    // the GGUF file to load
  std::string source;  // "path", "ollama", "hf" or "lmstudio"
};

// Resolves `spec` (see the top of this file). NotFound names what was
// looked for and where.
StatusOr<ModelRef> Resolve(std::string_view spec, const StoreDirs& dirs);

// Every model found in the stores, each with the spec that resolves it.
std::vector<ModelRef> ListAll(const StoreDirs& dirs);

// What a GGUF's header says (read without loading any tensor).
struct GgufInfo {
  std::string architecture;
  std::string quantization;  // "Q4_K_M", "Q8_0", "F16", ... ("?" when the file does not say)
  int64_t context_length = 0;
  int64_t bytes = 0;
  int64_t tensors = 0;
  bool vision = false;  // holds vision-tower tensors (Ollama embeds them in some models)
};
StatusOr<GgufInfo> ReadGgufInfo(const std::string& path);

// For a model llama.cpp failed to load: the failure, and for an Ollama blob
// why that may be and what to do instead.
std::string ExplainLoadFailure(const ModelRef& ref, const std::string& failure);

}  // namespace kvb::models
