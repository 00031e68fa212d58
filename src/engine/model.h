// A loaded GGUF model: weights, vocabulary and chat template. Read-only
// after loading, so tokenization may run on any thread while the engine
// thread decodes.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/prefix_tokens.h"
#include "engine/types.h"

struct llama_model;
struct llama_vocab;
struct common_chat_templates;

struct ggml_backend_device;

namespace kvb::engine {


struct ModelOptions {
  std::string path;
  int32_t n_gpu_layers = -1;  // -1: all layers on the GPU when there is one
  // The device for this copy of the model (data parallel, `--devices`):
  // "" llama.cpp's default placement, "cpu" the CPU only, "N" the N-th GPU
  // alone (no split across GPUs).
  std::string device;
  // The name requests and /v1/models know it by; empty: the file's stem.
  std::string name;
};

class Model {
 public:
  static StatusOr<std::unique_ptr<Model>> Load(const ModelOptions& options);
  ~Model();

  // The prompt for a chat, by the model's own template, ending with the
  // assistant's turn: rendered as Jinja by llama.cpp's common library (as
  // llama-server does) when kvbatch is built with it, else by
  // llama_chat_apply_template's built-in template detection.
  StatusOr<std::string> FormatChat(const std::vector<ChatMessage>& messages) const;
  // Tokens of a prompt; special tokens in the text are parsed, BOS added
  // when the model wants one.
  std::vector<Token> Tokenize(std::string_view text) const;
  // The same tokens, for a prompt whose start other prompts share: `shared`
  // is text near its start (a system message). That start is tokenized once
  // and reused (engine/prefix_tokens.h).
  std::vector<Token> Tokenize(std::string_view text, std::string_view shared) const;
  // How Tokenize(text, shared) went so far (all 0 when the tokenizer
  // appends tokens and nothing is cached).
  PrefixTokens::Stats prefix_token_stats() const;
  // A token's text; `special`: control tokens as their text, else as nothing.
  std::string Piece(Token t, bool special = false) const;

  const std::string& name() const { return name_; }  // ModelOptions::name, or the file name without .gguf
  int32_t n_ctx_train() const;
  int32_t n_vocab() const;
  // KV bytes per cell for an f16 cache.
  int64_t KvBytesPerCell() const;
  bool on_gpu() const { return on_gpu_; }
  // The GPU holding it (its memory sizes the KV cache); null on the CPU.
  ggml_backend_device* gpu() const { return gpu_; }

  // llama.cpp's parsed Jinja templates (engine/chat_tools.h renders tools with
  // them); null when the model has no template or kvbatch was built without
  // llama.cpp's common library.
  const common_chat_templates* chat_templates() const;

  llama_model* raw() const { return model_; }
  const llama_vocab* vocab() const { return vocab_; }

 private:
  Model() = default;
  std::vector<Token> TokenizeWith(std::string_view text, bool add_special) const;
  llama_model* model_ = nullptr;
  const llama_vocab* vocab_ = nullptr;
  std::string name_;
  std::string template_;
  bool on_gpu_ = false;
  ggml_backend_device* gpu_ = nullptr;
  struct Jinja;  // llama.cpp's common chat templates, when built with them
  std::unique_ptr<Jinja> jinja_;
  std::unique_ptr<PrefixTokens> prefix_tokens_;  // null when the tokenizer appends tokens (EOS, SEP)
};

// Initializes llama.cpp's backends once per process and routes its log to
// stderr only at warning level and above (or everything with KVBATCH_DEBUG).
void InitLlama();

}  // namespace kvb::engine
