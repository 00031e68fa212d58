#include "engine/model.h"

#include "engine/prefix_tokens.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>
#include <mutex>

#include "ggml-backend.h"
#include "llama.h"

#ifdef KVBATCH_HAVE_LLAMA_COMMON
#include "chat.h"
#endif

namespace kvb::engine {

#ifdef KVBATCH_HAVE_LLAMA_COMMON
struct Model::Jinja {
  common_chat_templates_ptr templates;
};
#else
struct Model::Jinja {};
#endif

namespace {

void LogToStderr(ggml_log_level level, const char* text, void*) {
  static const bool debug = std::getenv("KVBATCH_DEBUG") != nullptr;
  // The unified cache holds many sequences' cells; each sequence's own
  // context is capped at the model's training context by the scheduler, so
  // llama.cpp's warning about n_ctx_seq > n_ctx_train does not apply.
  if (!debug && std::strstr(text, "possible training context overflow")) return;
  if (debug || level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
}

}  // namespace

void InitLlama() {
  static std::once_flag once;
  std::call_once(once, [] {
    llama_log_set(LogToStderr, nullptr);
    llama_backend_init();
  });
}

StatusOr<std::unique_ptr<Model>> Model::Load(const ModelOptions& options) {
  InitLlama();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(options.path, ec))
    return Status::NotFound("model file not found: " + options.path);
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = options.n_gpu_layers;
  ggml_backend_dev_t only[2] = {nullptr, nullptr};  // mp.devices: null-terminated
  bool on_gpu = options.n_gpu_layers != 0;
  if (options.device == "cpu") {
    mp.n_gpu_layers = 0;
    on_gpu = false;
  } else if (!options.device.empty()) {
    char* end = nullptr;
    const long want = std::strtol(options.device.c_str(), &end, 10);
    std::vector<ggml_backend_dev_t> gpus;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
      ggml_backend_dev_t dev = ggml_backend_dev_get(i);
      if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) gpus.push_back(dev);
    }
    if (*end != '\0' || want < 0 || static_cast<size_t>(want) >= gpus.size())
      return Status::InvalidArgument("device '" + options.device + "' does not exist: use cpu or a GPU index below " +
                                     std::to_string(gpus.size()));
    only[0] = gpus[static_cast<size_t>(want)];
    mp.devices = only;
    mp.split_mode = LLAMA_SPLIT_MODE_NONE;
    mp.main_gpu = 0;
  }
  llama_model* raw = llama_model_load_from_file(options.path.c_str(), mp);
  if (!raw) return Status::InvalidArgument("llama.cpp could not load the model " + options.path);
  std::unique_ptr<Model> m(new Model);
  m->model_ = raw;
  m->vocab_ = llama_model_get_vocab(raw);
  m->name_ = options.name.empty() ? std::filesystem::path(options.path).stem().string() : options.name;
  if (const char* t = llama_model_chat_template(raw, nullptr)) m->template_ = t;
#ifdef KVBATCH_HAVE_LLAMA_COMMON
  if (!m->template_.empty()) {
    try {
      auto jinja = std::make_unique<Jinja>();
      jinja->templates = common_chat_templates_init(raw, "");
      if (jinja->templates) m->jinja_ = std::move(jinja);
    } catch (const std::exception& e) {
      // Not renderable as Jinja: the built-in detection may still know it.
      std::fprintf(stderr, "kvbatch: the model's chat template does not parse as Jinja (%s); using llama.cpp's built-in templates\n", e.what());
    }
  }
#endif
  for (size_t i = 0; i < ggml_backend_dev_count() && on_gpu && m->gpu_ == nullptr; ++i) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) m->gpu_ = only[0] ? only[0] : dev;
  }
  m->on_gpu_ = m->gpu_ != nullptr;
  if (!llama_vocab_get_add_eos(m->vocab_) && !llama_vocab_get_add_sep(m->vocab_)) {
    const Model* raw = m.get();
    PrefixTokens::Options options;
    options.splits = SplitTexts(m->vocab_);
    m->prefix_tokens_ = std::make_unique<PrefixTokens>(
        [raw](std::string_view text, bool add_special) { return raw->TokenizeWith(text, add_special); },
        SpecialTokenTexts(m->vocab_), std::move(options));
  }
  return m;
}

Model::~Model() {
  prefix_tokens_.reset();
  if (model_) llama_model_free(model_);
}

StatusOr<std::string> Model::FormatChat(const std::vector<ChatMessage>& messages) const {
#ifdef KVBATCH_HAVE_LLAMA_COMMON
  if (jinja_) {
    common_chat_templates_inputs in;
    for (const auto& m : messages) {
      common_chat_msg msg;
      msg.role = m.role;
      msg.content = m.content;
      in.messages.push_back(std::move(msg));
    }
    in.add_generation_prompt = true;
    in.use_jinja = true;
    try {
      return common_chat_templates_apply(jinja_->templates.get(), in).prompt;
    } catch (const std::exception& e) {
      return Status::InvalidArgument(std::string("the model's chat template rejected these messages: ") + e.what());
    }
  }
#endif
  std::vector<llama_chat_message> chat;
  size_t chars = 0;
  for (const auto& m : messages) {
    chat.push_back({m.role.c_str(), m.content.c_str()});
    chars += m.role.size() + m.content.size();
  }
  const char* tmpl = template_.empty() ? nullptr : template_.c_str();
  std::string buf(2 * chars + 256, '\0');
  int32_t n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), true, buf.data(), static_cast<int32_t>(buf.size()));
  if (n > static_cast<int32_t>(buf.size())) {
    buf.resize(n);
    n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), true, buf.data(), static_cast<int32_t>(buf.size()));
  }
  if (n < 0)
    return Status::FailedPrecondition("this model's chat template is not supported by llama.cpp's template engine");
  buf.resize(n);
  return buf;
}

std::vector<Token> Model::Tokenize(std::string_view text) const { return TokenizeWith(text, true); }

std::vector<Token> Model::Tokenize(std::string_view text, std::string_view shared) const {
  return prefix_tokens_ ? prefix_tokens_->Tokenize(text, shared) : TokenizeWith(text, true);
}

PrefixTokens::Stats Model::prefix_token_stats() const {
  return prefix_tokens_ ? prefix_tokens_->stats() : PrefixTokens::Stats{};
}

std::vector<Token> Model::TokenizeWith(std::string_view text, bool add_special) const {
  std::vector<Token> out(text.size() / 2 + 16);
  int32_t n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                             static_cast<int32_t>(out.size()), add_special, /*parse_special=*/true);
  if (n < 0) {
    out.resize(-n);
    n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                       static_cast<int32_t>(out.size()), add_special, true);
  }
  out.resize(std::max(0, n));
  return out;
}

std::string Model::Piece(Token t, bool special) const {
  char buf[256];
  int32_t n = llama_token_to_piece(vocab_, t, buf, sizeof(buf), 0, special);
  if (n < 0) {
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab_, t, big.data(), static_cast<int32_t>(big.size()), 0, special);
    big.resize(std::max(0, n));
    return big;
  }
  return std::string(buf, n);
}

const common_chat_templates* Model::chat_templates() const {
#ifdef KVBATCH_HAVE_LLAMA_COMMON
  if (jinja_) return jinja_->templates.get();
#endif
  return nullptr;
}

int32_t Model::n_ctx_train() const { return llama_model_n_ctx_train(model_); }
int32_t Model::n_vocab() const { return llama_vocab_n_tokens(vocab_); }

int64_t Model::KvBytesPerCell() const {
  const int64_t n_layer = llama_model_n_layer(model_);
  const int64_t n_head = std::max(1, llama_model_n_head(model_));
  const int64_t head_dim = llama_model_n_embd(model_) / n_head;
  const int64_t n_embd_kv = head_dim * llama_model_n_head_kv(model_);
  return n_layer * 2 * n_embd_kv * 2;  // K and V, f16
}

}  // namespace kvb::engine
