// Test/demo model generator: writes a small, randomly initialised
// llama-architecture GGUF that llama.cpp loads and runs like a real model.
//
// Why: tests and benchmarks need a model that exercises the real inference
// path (tokenizer, KV cache, batching) without downloading gigabytes. The
// weights are random, so the text is gibberish, but it is deterministic and
// depends on the prompt, which is what scheduler and cache tests check.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "ggml.h"
#include "util/status.h"

namespace kvb::tools {

// ChatML; llama_chat_apply_template recognises it as "chatml".
inline constexpr std::string_view kChatMlTemplate =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}";

// Llama 3's chat format (the llama3-8b preset): its turn markers are special
// tokens of the llama-bpe vocabulary, as in the real model, so llama.cpp
// splits prompts at them and a shared system message is tokenized once
// (engine/prefix_tokens.h). BOS comes from the tokenizer, not the template.
inline constexpr std::string_view kLlama3Template =
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

struct GenModelOptions {
  // A ggml-vocab-*.gguf (llama.cpp ships them in models/); every tokenizer.*
  // key is copied, so the model tokenizes exactly like the model the vocab
  // came from. The vocabulary size follows from tokenizer.ggml.tokens.
  std::string vocab_path;
  std::string out_path;
  std::string name = "kvbatch-test";  // general.name
  // "llama" (a decoder) or "bert" (an encoder for embeddings: mean pooling,
  // learned positions, biases, no chat use).
  std::string arch = "llama";
  // The vocabulary a preset is meant for, in llama.cpp's models/ folder.
  std::string vocab_file = "ggml-vocab-llama-spm.gguf";

  int n_embd = 64;
  int n_layer = 2;
  int n_head = 4;
  int n_head_kv = 4;  // must divide n_head (grouped-query attention)
  int n_ff = 192;
  int n_ctx_train = 4096;

  // Type of the 2-D matrices: GGML_TYPE_Q8_0, GGML_TYPE_F16 or GGML_TYPE_F32.
  // Norm weights are always F32, as llama.cpp's converters write them.
  // Q8_0 needs n_embd and n_ff to be multiples of 32.
  ggml_type weight_type = GGML_TYPE_Q8_0;

  // The file is a pure function of all options: same options, same bytes.
  uint64_t seed = 42;
  // Threads generating the weights (0: one per core, at most 16). The file
  // does not depend on it.
  int threads = 0;
  // Elements per random stream (whole rows): a tensor larger than this is
  // drawn from several streams, in parallel. Part of what fixes the weights.
  int64_t stream_elements = int64_t{1} << 24;

  std::string chat_template = std::string(kChatMlTemplate);  // tokenizer.chat_template
};

// "tiny" (~5 MB, for unit and integration tests), "bench" (~60 MB, for
// benchmarks) or "bert" (a small BERT embedding model, WordPiece vocabulary). vocab_path and out_path are left empty for the caller.
StatusOr<GenModelOptions> ModelPreset(std::string_view name);

// Writes the model to opts.out_path. The file appears atomically (written to
// a temporary name, then renamed), so a crash never leaves a truncated model.
// Errors: InvalidArgument for inconsistent shapes or an unsupported type,
// NotFound/InvalidArgument for an unreadable vocab, IoError for write errors.
Status GenerateModel(const GenModelOptions& opts);

}  // namespace kvb::tools
