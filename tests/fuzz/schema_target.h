// fuzz_schema: a response_format JSON schema to a GBNF grammar
// (engine::JsonSchemaToGrammar, llama.cpp's converter), then the grammar
// through llama.cpp's grammar parser as engine::CheckGrammar does, against
// a real vocabulary (ggml-vocab-llama-bpe.gguf loaded vocab-only) when
// KVBATCH_VOCAB_DIR names a folder holding it.
//
// Invariants: nothing crashes, hangs or throws; a failure is InvalidArgument
// (it becomes the request's 400 line). A grammar llama.cpp does not parse is
// not a failure here: CheckGrammar turns it into a 400 as well.
#pragma once

#include <cstdlib>
#include <string>
#include <string_view>

#include "engine/grammar.h"
#include "fuzz_check.h"
#include "llama.h"

namespace kvb::fuzz {

inline void QuietLlamaLog(ggml_log_level, const char*, void*) {}

// The vocabulary, loaded once; null when none is found (the grammar check
// is then skipped).
inline const llama_vocab* FuzzVocab() {
  static const llama_vocab* vocab = [] () -> const llama_vocab* {
    std::string dir;
    if (const char* env = std::getenv("KVBATCH_VOCAB_DIR")) dir = env;
#ifdef KVBATCH_VOCAB_DIR
    if (dir.empty()) dir = KVBATCH_VOCAB_DIR;
#endif
    if (dir.empty()) return nullptr;
    llama_log_set(QuietLlamaLog, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model* model = llama_model_load_from_file((dir + "/ggml-vocab-llama-bpe.gguf").c_str(), mp);
    if (!model) {
      std::fprintf(stderr, "fuzz_schema: no vocabulary in %s; grammars are not parsed\n", dir.c_str());
      return nullptr;
    }
    return llama_model_get_vocab(model);  // kept for the process's life
  }();
  return vocab;
}

inline void FuzzSchema(const uint8_t* data, size_t size) {
  const llama_vocab* vocab = FuzzVocab();
  const std::string_view schema(reinterpret_cast<const char*>(data), size);
  const auto grammar = engine::JsonSchemaToGrammar(schema);
  static const bool verbose = std::getenv("KVB_FUZZ_VERBOSE") != nullptr;
  if (verbose)
    std::fprintf(stderr, "fuzz_schema: %s\n",
                 grammar.ok() ? ("grammar of " + std::to_string(grammar->size()) + " bytes").c_str()
                              : grammar.status().ToString().substr(0, 300).c_str());
  if (!grammar.ok()) {
    KVB_FUZZ_CHECK(grammar.status().code() == StatusCode::kInvalidArgument ||
                       grammar.status().code() == StatusCode::kFailedPrecondition,
                   "JsonSchemaToGrammar failed with " + grammar.status().ToString());
    return;
  }
  KVB_FUZZ_CHECK(!grammar->empty(), "an empty grammar for an accepted schema");
  if (!vocab) return;
  if (llama_sampler* sampler = llama_sampler_init_grammar(vocab, grammar->c_str(), "root"))
    llama_sampler_free(sampler);
}

}  // namespace kvb::fuzz
