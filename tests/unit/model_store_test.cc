// Models by name: Ollama, Hugging Face and LM Studio stores laid out in a
// temporary directory, resolved without any network.
#include "models/model_store.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "tools/gen_model.h"

namespace kvb::models {
namespace {

namespace fs = std::filesystem;

class ModelStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("kvbatch-models-" + std::to_string(::getpid()) + "-" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    dirs_.ollama = (root_ / "ollama").string();
    dirs_.hf = {(root_ / "hf").string(), (root_ / "llama-cache").string()};
    dirs_.lmstudio = {(root_ / "lmstudio").string()};
  }
  void TearDown() override { fs::remove_all(root_); }

  static void Write(const fs::path& p, const std::string& text = "GGUF") {
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  // An Ollama model: its manifest and its model blob.
  std::string Ollama(const std::string& ns, const std::string& model, const std::string& tag,
                     const std::string& hex, const std::string& host = "example.org") {
    const fs::path base = dirs_.ollama;
    Write(base / "manifests" / host / ns / model / tag,
          R"({"schemaVersion":2,"layers":[{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:aa"},)"
          R"({"mediaType":"application/vnd.ollama.image.model","digest":"sha256:)" + hex + R"(","size":4}]})");
    const fs::path blob = base / "blobs" / ("sha256-" + hex);
    Write(blob);
    return blob.string();
  }
  // A Hugging Face hub repository with one snapshot.
  fs::path HfRepo(const std::string& org, const std::string& repo, const std::vector<std::string>& files) {
    const fs::path dir = fs::path(dirs_.hf[0]) / ("models--" + org + "--" + repo);
    Write(dir / "refs" / "main", "abc123\n");
    for (const auto& f : files) Write(dir / "snapshots" / "abc123" / f);
    Write(dir / "snapshots" / "old999" / "stale.gguf");  // another revision: never picked
    return dir / "snapshots" / "abc123";
  }

  fs::path root_;
  StoreDirs dirs_;
};

TEST_F(ModelStoreTest, APathIsItselfNamedByItsStem) {
  Write(root_ / "m" / "my-model.gguf");
  auto r = Resolve((root_ / "m" / "my-model.gguf").string(), dirs_);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->name, "my-model");
  EXPECT_EQ(r->source, "path");
}

TEST_F(ModelStoreTest, OllamaNamesGoThroughTheManifestToTheModelBlob) {
  const std::string gemma = Ollama("library", "gemma3", "12b", "1111");
  const std::string latest = Ollama("library", "qwen3", "latest", "2222");
  const std::string user = Ollama("someone", "tuned", "v2", "3333");
  for (const auto& [spec, blob] : std::vector<std::pair<std::string, std::string>>{
           {"ollama:gemma3:12b", gemma}, {"gemma3:12b", gemma}, {"ollama:library/gemma3:12b", gemma},
           {"ollama:example.org/library/gemma3:12b", gemma}, {"ollama:qwen3", latest}, {"qwen3:latest", latest},
           {"ollama:someone/tuned:v2", user}}) {
    auto r = Resolve(spec, dirs_);
    ASSERT_TRUE(r.ok()) << spec << ": " << r.status().message();
    EXPECT_EQ(r->path, blob) << spec;
    EXPECT_EQ(r->name, spec);
    EXPECT_EQ(r->source, "ollama");
  }
  auto missing = Resolve("ollama:gemma3:27b", dirs_);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("OLLAMA_MODELS"), std::string::npos);
  fs::remove(gemma);  // an interrupted pull
  auto gone = Resolve("ollama:gemma3:12b", dirs_);
  EXPECT_EQ(gone.status().code(), StatusCode::kNotFound);
  EXPECT_NE(gone.status().message().find("sha256-1111"), std::string::npos);
}

TEST_F(ModelStoreTest, HostileNamesNeverLeaveTheStore) {
  Ollama("library", "gemma3", "12b", "1111");
  for (const std::string spec : {"ollama:../gemma3:12b", "ollama:gemma3:..", "ollama:a/b/c/d:1", "hf:../x",
                                 "hf:org/../repo", "hf:org/repo:../../etc/passwd", "lmstudio:../../x", "ollama:"})
    EXPECT_FALSE(Resolve(spec, dirs_).ok()) << spec;
}

TEST_F(ModelStoreTest, HuggingFaceCachePicksTheFileOrTheQuantisation) {
  const fs::path snap = HfRepo("Org", "Model-GGUF",
                               {"model-Q4_K.gguf", "model-Q4_K_M.gguf", "model-Q8_0.gguf", "mmproj-model-f16.gguf",
                                "big/model-F16-00001-of-00002.gguf", "big/model-F16-00002-of-00002.gguf"});
  auto pick = [&](const std::string& spec) {
    auto r = Resolve(spec, dirs_);
    return r.ok() ? fs::relative(r->path, snap).string() : "error: " + r.status().message();
  };
  EXPECT_EQ(pick("hf:Org/Model-GGUF:Q8_0"), "model-Q8_0.gguf");
  EXPECT_EQ(pick("hf:Org/Model-GGUF:q4_k_m"), "model-Q4_K_M.gguf");
  EXPECT_EQ(pick("hf:Org/Model-GGUF:Q4_K"), "model-Q4_K.gguf");  // not Q4_K_M
  EXPECT_EQ(pick("hf:Org/Model-GGUF:F16"), "big/model-F16-00001-of-00002.gguf");  // a split: its first part
  EXPECT_EQ(pick("hf:Org/Model-GGUF:model-Q8_0.gguf"), "model-Q8_0.gguf");
  EXPECT_EQ(pick("hf:Org/Model-GGUF"), "model-Q4_K_M.gguf");  // several: Q4_K_M, as llama.cpp's -hf
  EXPECT_NE(pick("hf:Org/Model-GGUF:Q5_K_M").find("model-Q8_0.gguf"), std::string::npos);  // lists what there is
  EXPECT_NE(pick("hf:Org/Other").find("HF_HUB_CACHE"), std::string::npos);
  auto r = Resolve("hf:Org/Model-GGUF:Q8_0", dirs_);
  EXPECT_EQ(r->source, "hf");
  EXPECT_EQ(r->name, "hf:Org/Model-GGUF:Q8_0");

  HfRepo("Org", "Two", {"a-Q8_0.gguf", "b-Q6_K.gguf"});
  auto two = Resolve("hf:Org/Two", dirs_);
  EXPECT_EQ(two.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(two.status().message().find("b-Q6_K.gguf"), std::string::npos);
}

TEST_F(ModelStoreTest, LlamaCppsFlatCacheAndLmStudio) {
  Write(fs::path(dirs_.hf[1]) / "Org_Repo_repo-Q8_0.gguf");
  auto flat = Resolve("hf:Org/Repo", dirs_);
  ASSERT_TRUE(flat.ok()) << flat.status().message();
  EXPECT_EQ(fs::path(flat->path).filename(), "Org_Repo_repo-Q8_0.gguf");

  Write(fs::path(dirs_.lmstudio[0]) / "lmstudio-community" / "Qwen3-8B-GGUF" / "Qwen3-8B-Q4_K_M.gguf");
  auto lm = Resolve("lmstudio:lmstudio-community/Qwen3-8B-GGUF", dirs_);
  ASSERT_TRUE(lm.ok()) << lm.status().message();
  EXPECT_EQ(lm->source, "lmstudio");
  EXPECT_EQ(fs::path(lm->path).filename(), "Qwen3-8B-Q4_K_M.gguf");
  EXPECT_FALSE(Resolve("lmstudio:nobody/nothing", dirs_).ok());
}

TEST_F(ModelStoreTest, ListAllNamesEveryModelByASpecThatResolvesToIt) {
  Ollama("library", "gemma3", "12b", "1111");
  Ollama("someone", "tuned", "v2", "3333");
  HfRepo("Org", "Model-GGUF", {"model-Q4_K_M.gguf", "model-Q8_0.gguf"});
  HfRepo("Org", "One", {"one-Q8_0.gguf"});
  Write(fs::path(dirs_.lmstudio[0]) / "pub" / "m" / "m-Q8_0.gguf");
  std::set<std::string> names;
  for (const ModelRef& m : ListAll(dirs_)) {
    names.insert(m.name);
    auto r = Resolve(m.name, dirs_);
    ASSERT_TRUE(r.ok()) << m.name << ": " << r.status().message();
    EXPECT_EQ(r->path, m.path) << m.name;
  }
  EXPECT_EQ(names, (std::set<std::string>{"ollama:gemma3:12b", "ollama:someone/tuned:v2",
                                          "hf:Org/Model-GGUF:model-Q4_K_M.gguf", "hf:Org/Model-GGUF:model-Q8_0.gguf",
                                          "hf:Org/One", "lmstudio:pub/m"}));
}

TEST_F(ModelStoreTest, GgufHeaderGivesArchitectureQuantisationAndContext) {
  auto opts = tools::ModelPreset("tiny");
  ASSERT_TRUE(opts.ok());
  fs::create_directories(root_);
  opts->out_path = (root_ / "tiny.gguf").string();
  opts->vocab_path = std::string(std::getenv("KVBATCH_VOCAB_DIR") ? std::getenv("KVBATCH_VOCAB_DIR") : "") +
                     "/ggml-vocab-llama-spm.gguf";
  ASSERT_TRUE(tools::GenerateModel(*opts).ok());
  auto info = ReadGgufInfo(opts->out_path);
  ASSERT_TRUE(info.ok()) << info.status().message();
  EXPECT_EQ(info->architecture, "llama");
  EXPECT_EQ(info->quantization, "Q8_0");
  EXPECT_GT(info->context_length, 0);
  EXPECT_GT(info->bytes, 1000);
  EXPECT_FALSE(info->vision);
  Write(root_ / "not.gguf", "plain text");
  EXPECT_FALSE(ReadGgufInfo((root_ / "not.gguf").string()).ok());

  const std::string why = ExplainLoadFailure({"ollama:gemma3:12b", opts->out_path, "ollama"}, "cannot load");
  EXPECT_NE(why.find("Remedy"), std::string::npos);
  EXPECT_EQ(ExplainLoadFailure({"x", opts->out_path, "path"}, "cannot load"), "cannot load");
}

}  // namespace
}  // namespace kvb::models
