// The generated model must be something llama.cpp loads and runs like a real
// one: scheduler and cache tests built on it rely on outputs that depend on
// the prompt and are reproducible.
#include "tools/gen_model.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "gguf.h"
#include "llama.h"

namespace kvb::tools {
namespace {

namespace fs = std::filesystem;

constexpr int kGenTokens = 16;

void QuietLog(ggml_log_level, const char*, void*) {}

// The vocab files come from the llama.cpp install (share/vocab); unit tests
// get no compile-time path, so the environment names it.
std::string VocabPath() {
  const char* dir = std::getenv("KVBATCH_VOCAB_DIR");
  if (dir == nullptr || *dir == '\0') return "";
  return (fs::path(dir) / "ggml-vocab-llama-spm.gguf").string();
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Generates the tiny model once for the whole suite; it takes a fraction of
// a second, but loading it in every test is cheaper still.
class GenModelTest : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    llama_backend_init();
    llama_log_set(QuietLog, nullptr);
    dir_ = new fs::path(fs::temp_directory_path() /
                        ("kvb_gen_model_test_" + std::to_string(getpid())));
    fs::create_directories(*dir_);
    if (VocabPath().empty()) return;
    StatusOr<GenModelOptions> opts = ModelPreset("tiny");
    ASSERT_TRUE(opts.ok());
    opts->vocab_path = VocabPath();
    opts->out_path = (*dir_ / "tiny.gguf").string();
    generate_status_ = new Status(GenerateModel(*opts));
  }

  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*dir_, ec);
    delete dir_;
    delete generate_status_;
    dir_ = nullptr;
    generate_status_ = nullptr;
  }

  void SetUp() override {
    if (VocabPath().empty()) {
      GTEST_SKIP() << "KVBATCH_VOCAB_DIR is not set (point it at <llama prefix>/share/vocab)";
    }
    ASSERT_NE(generate_status_, nullptr);
    ASSERT_TRUE(generate_status_->ok()) << generate_status_->ToString();
  }

  void TearDown() override {
    if (ctx_ != nullptr) llama_free(ctx_);
    if (model_ != nullptr) llama_model_free(model_);
  }

  static fs::path TinyPath() { return *dir_ / "tiny.gguf"; }

  void Load() {
    model_ = llama_model_load_from_file(TinyPath().c_str(), llama_model_default_params());
    ASSERT_NE(model_, nullptr);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 256;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    ctx_ = llama_init_from_model(model_, cp);
    ASSERT_NE(ctx_, nullptr);
  }

  // Greedy continuation of `prompt` from an empty KV cache.
  std::vector<llama_token> Greedy(const std::string& prompt) {
    const llama_vocab* vocab = llama_model_get_vocab(model_);
    std::vector<llama_token> tokens(prompt.size() + 8);
    const int n = llama_tokenize(vocab, prompt.data(), static_cast<int32_t>(prompt.size()),
                                 tokens.data(), static_cast<int32_t>(tokens.size()),
                                 /*add_special=*/true, /*parse_special=*/false);
    EXPECT_GT(n, 0);
    tokens.resize(n > 0 ? n : 0);

    llama_memory_clear(llama_get_memory(ctx_), /*data=*/true);
    llama_sampler* greedy = llama_sampler_init_greedy();
    std::vector<llama_token> out;
    llama_batch batch = llama_batch_get_one(tokens.data(), static_cast<int32_t>(tokens.size()));
    llama_token next = 0;
    for (int i = 0; i < kGenTokens; ++i) {
      if (llama_decode(ctx_, batch) != 0) {
        ADD_FAILURE() << "llama_decode failed";
        break;
      }
      next = llama_sampler_sample(greedy, ctx_, -1);
      out.push_back(next);
      batch = llama_batch_get_one(&next, 1);
    }
    llama_sampler_free(greedy);
    return out;
  }

  static fs::path* dir_;
  static Status* generate_status_;
  llama_model* model_ = nullptr;
  llama_context* ctx_ = nullptr;
};

fs::path* GenModelTest::dir_ = nullptr;
Status* GenModelTest::generate_status_ = nullptr;

TEST_F(GenModelTest, TinyModelLoadsAndAnswersDependOnPrompt) {
  ASSERT_NO_FATAL_FAILURE(Load());
  const std::vector<std::string> prompts = {"Hello, my name is", "The capital of France is",
                                            "1 2 3 4 5"};
  std::vector<std::vector<llama_token>> outputs;
  for (const std::string& p : prompts) {
    outputs.push_back(Greedy(p));
    ASSERT_EQ(outputs.back().size(), static_cast<size_t>(kGenTokens));
    const std::set<llama_token> distinct(outputs.back().begin(), outputs.back().end());
    EXPECT_GT(distinct.size(), 2u) << "greedy output of '" << p << "' repeats itself";
  }
  EXPECT_NE(outputs[0], outputs[1]);
  EXPECT_NE(outputs[0], outputs[2]);
  EXPECT_NE(outputs[1], outputs[2]);
}

TEST_F(GenModelTest, SamePromptGivesSameAnswerTwice) {
  ASSERT_NO_FATAL_FAILURE(Load());
  const std::vector<llama_token> first = Greedy("Once upon a time");
  const std::vector<llama_token> second = Greedy("Once upon a time");
  EXPECT_EQ(first, second);
}

TEST_F(GenModelTest, TinyModelHasLlamaShapeVocabAndChatMlTemplate) {
  ASSERT_NO_FATAL_FAILURE(Load());
  EXPECT_EQ(llama_model_n_embd(model_), 64);
  EXPECT_EQ(llama_model_n_layer(model_), 2);
  EXPECT_EQ(llama_model_n_head(model_), 4);
  EXPECT_EQ(llama_model_n_ctx_train(model_), 4096);
  EXPECT_EQ(llama_vocab_n_tokens(llama_model_get_vocab(model_)), 32000);

  // The template must be recognised, not just stored: the engine formats
  // chat requests through llama_chat_apply_template.
  const llama_chat_message msg = {"user", "hi"};
  char buf[256];
  const int n = llama_chat_apply_template(llama_model_chat_template(model_, nullptr), &msg, 1,
                                          /*add_ass=*/true, buf, sizeof(buf));
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, n), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");

  const uintmax_t size = fs::file_size(TinyPath());
  EXPECT_GT(size, 4'000'000u);
  EXPECT_LT(size, 7'000'000u);
}

TEST_F(GenModelTest, OnlyTokenizerKeysAreTakenFromTheVocabFile) {
  gguf_init_params params = {/*no_alloc=*/true, /*ctx=*/nullptr};
  gguf_context* g = gguf_init_from_file(TinyPath().c_str(), params);
  ASSERT_NE(g, nullptr);
  const int64_t arch = gguf_find_key(g, "general.architecture");
  ASSERT_GE(arch, 0);
  EXPECT_STREQ(gguf_get_val_str(g, arch), "llama");
  for (int64_t i = 0; i < gguf_get_n_kv(g); ++i) {
    const std::string key = gguf_get_key(g, i);
    EXPECT_TRUE(key.rfind("tokenizer.", 0) == 0 || key.rfind("general.", 0) == 0 ||
                key.rfind("llama.", 0) == 0)
        << key;
  }
  EXPECT_EQ(gguf_get_n_tensors(g), 3 + 9 * 2);
  gguf_free(g);
}

TEST_F(GenModelTest, SameSeedGivesByteIdenticalFilesAndOtherSeedsDiffer) {
  StatusOr<GenModelOptions> opts = ModelPreset("tiny");
  ASSERT_TRUE(opts.ok());
  opts->vocab_path = VocabPath();
  opts->out_path = (*dir_ / "again.gguf").string();
  ASSERT_TRUE(GenerateModel(*opts).ok());
  EXPECT_TRUE(ReadFile(TinyPath()) == ReadFile(opts->out_path)) << "same seed, different bytes";

  opts->seed = 7;
  opts->out_path = (*dir_ / "seed7.gguf").string();
  ASSERT_TRUE(GenerateModel(*opts).ok());
  EXPECT_FALSE(ReadFile(TinyPath()) == ReadFile(opts->out_path));
}

// Tensors larger than one random stream are drawn by several threads; the
// file is the same with any number of them, and tensors within one stream
// are the same as ever (the tiny file above).
TEST_F(GenModelTest, ManyStreamsGiveTheSameFileWithAnyNumberOfThreads) {
  StatusOr<GenModelOptions> opts = ModelPreset("tiny");
  ASSERT_TRUE(opts.ok());
  opts->vocab_path = VocabPath();
  opts->stream_elements = 4096;  // 64 rows of 64: token_embd alone takes 500 streams
  opts->threads = 1;
  opts->out_path = (*dir_ / "one.gguf").string();
  ASSERT_TRUE(GenerateModel(*opts).ok());
  opts->threads = 3;
  opts->out_path = (*dir_ / "three.gguf").string();
  ASSERT_TRUE(GenerateModel(*opts).ok());
  const std::string one = ReadFile(opts->out_path);
  EXPECT_TRUE(ReadFile((*dir_ / "one.gguf").string()) == one) << "the thread count changed the weights";
  EXPECT_EQ(one.size(), ReadFile(TinyPath()).size());
  EXPECT_FALSE(ReadFile(TinyPath()) == one) << "streams past the first must not repeat the first";
}

TEST(GenModel, PresetsAreTinyAndBench) {
  StatusOr<GenModelOptions> tiny = ModelPreset("tiny");
  ASSERT_TRUE(tiny.ok());
  EXPECT_EQ(tiny->weight_type, GGML_TYPE_Q8_0);
  StatusOr<GenModelOptions> bench = ModelPreset("bench");
  ASSERT_TRUE(bench.ok());
  EXPECT_EQ(bench->n_embd, 512);
  EXPECT_EQ(bench->n_layer, 8);
  EXPECT_EQ(ModelPreset("huge").status().code(), StatusCode::kInvalidArgument);
}

// The GPU benchmark's preset, and its Q4_K weights on a model small enough
// to write here: Llama 3 8B's shape scaled down (GQA 4:1, rows of 256).
TEST_F(GenModelTest, Llama3PresetIsEightBShapedAndQ4KWeightsLoadAndRun) {
  StatusOr<GenModelOptions> big = ModelPreset("llama3-8b");
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->n_embd, 4096);
  EXPECT_EQ(big->n_layer, 32);
  EXPECT_EQ(big->n_head, 32);
  EXPECT_EQ(big->n_head_kv, 8);
  EXPECT_EQ(big->n_ff, 14336);
  EXPECT_EQ(big->weight_type, GGML_TYPE_Q4_K);
  EXPECT_EQ(big->vocab_file, "ggml-vocab-llama-bpe.gguf");

  GenModelOptions small = *big;
  small.n_embd = 256;
  small.n_layer = 2;
  small.n_head = 4;
  small.n_head_kv = 1;
  small.n_ff = 512;
  small.vocab_path = VocabPath();
  small.out_path = (*dir_ / "q4k.gguf").string();
  ASSERT_TRUE(GenerateModel(small).ok());
  llama_model* m = llama_model_load_from_file(small.out_path.c_str(), llama_model_default_params());
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(llama_model_n_head_kv(m), 1);
  char desc[128];
  llama_model_desc(m, desc, sizeof(desc));
  EXPECT_NE(std::string(desc).find("Q4_K"), std::string::npos) << desc;
  llama_model_free(m);
}

TEST(GenModel, RejectsRowsQ8_0CannotStore) {
  GenModelOptions opts = *ModelPreset("tiny");
  opts.vocab_path = "unused.gguf";
  opts.out_path = "unused_out.gguf";
  opts.n_ff = 100;  // not a multiple of the Q8_0 block (32)
  EXPECT_EQ(GenerateModel(opts).code(), StatusCode::kInvalidArgument);
  opts.weight_type = GGML_TYPE_F32;  // any row length works unquantised
  EXPECT_EQ(GenerateModel(opts).code(), StatusCode::kNotFound);
}

TEST(GenModel, MissingVocabIsNotFoundAndWritesNothing) {
  const fs::path out =
      fs::temp_directory_path() / ("kvb_gen_model_missing_" + std::to_string(getpid()) + ".gguf");
  GenModelOptions opts = *ModelPreset("tiny");
  opts.vocab_path = "/nonexistent/ggml-vocab.gguf";
  opts.out_path = out.string();
  EXPECT_EQ(GenerateModel(opts).code(), StatusCode::kNotFound);
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
}  // namespace kvb::tools
