// The embedder on generated models: a BERT encoder (mean pooling, the
// WordPiece vocabulary) and the tiny decoder (last-token pooling). Vectors
// have the model's width and unit length, and an input embedded among many
// equals the same input embedded alone.
#include "engine/embedder.h"

#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <map>
#include <mutex>

#include "fixtures.h"

namespace kvb::testing {
namespace {

using engine::Embedder;
using engine::Model;
using engine::Request;
using engine::Result;

// The BERT model, generated once per test process in a folder of its own
// (ctest runs this file's tests as parallel processes), removed at exit.
const std::string& BertModel() {
  static const struct Holder {
    fs::path dir;
    std::string path;
    Holder() {
      dir = TestDir("bert-model-" + std::to_string(::getpid()));
      auto opts = tools::ModelPreset("bert");
      opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/" + opts->vocab_file;
      opts->out_path = (dir / "bert.gguf").string();
      EXPECT_TRUE(tools::GenerateModel(*opts).ok());
      path = opts->out_path;
    }
    ~Holder() { fs::remove_all(dir); }
  } holder;
  return holder.path;
}

// Submits requests and waits for all their results.
class Harness {
 public:
  explicit Harness(const Model* model, engine::ContextOptions options = {}) {
    options.n_threads = 2;
    auto e = Embedder::Start(
        model, options,
        [this](Result&& r) {
          std::lock_guard<std::mutex> lock(mu_);
          results_[r.id] = std::move(r);
          cv_.notify_all();
        },
        nullptr);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    embedder_ = std::move(e).value();
  }
  std::map<uint64_t, Result> Run(std::vector<Request> requests) {
    const size_t n = requests.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      results_.clear();
    }
    for (auto& r : requests) embedder_->Submit(std::move(r));
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return results_.size() == n; });
    return std::move(results_);
  }
  Embedder& embedder() { return *embedder_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Result> results_;
  std::unique_ptr<Embedder> embedder_;
};

double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return d / std::sqrt(na * nb);
}

std::vector<std::string> Texts() {
  std::vector<std::string> t;
  for (int i = 0; i < 30; ++i)
    t.push_back("candidate " + std::to_string(i) + " has " + std::string(static_cast<size_t>(i % 7 + 1), 'x') +
                " years of logistics experience");
  return t;
}

void ExpectEachAsAlone(const Model& model, const char* pooling, int32_t width, engine::ContextOptions options = {}) {
  Harness h(&model, options);
  EXPECT_STREQ(h.embedder().pooling(), pooling);
  EXPECT_EQ(h.embedder().n_embd(), width);
  const auto texts = Texts();
  Request all;
  all.id = 1;
  for (const auto& t : texts) all.embed.push_back(model.Tokenize(t));
  auto together = h.Run({all});
  const Result& many = together.at(1);
  ASSERT_TRUE(many.status.ok()) << many.status.ToString();
  ASSERT_EQ(many.embeddings.size(), texts.size());
  std::vector<Request> alone;
  for (size_t i = 0; i < texts.size(); ++i) {
    Request r;
    r.id = 100 + i;
    r.embed.push_back(model.Tokenize(texts[i]));
    alone.push_back(std::move(r));
  }
  auto separate = h.Run(std::move(alone));
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto& v = many.embeddings[i];
    ASSERT_EQ(static_cast<int32_t>(v.size()), width);
    double norm = 0;
    for (float x : v) norm += x * x;
    EXPECT_NEAR(norm, 1.0, 1e-4);
    EXPECT_GT(Cosine(v, separate.at(100 + i).embeddings.at(0)), 0.999) << "input " << i;
  }
  EXPECT_LT(Cosine(many.embeddings[0], many.embeddings[5]), 0.999);  // inputs differ, vectors differ
}

TEST(Embeddings, BertMeanPoolingEachInputAsAlone) {
  auto m = Model::Load({BertModel(), 0});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ExpectEachAsAlone(**m, "mean", 128);
}

TEST(Embeddings, DecoderLastTokenPoolingEachInputAsAlone) {
  auto m = Model::Load({TinyModel(), 0});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ExpectEachAsAlone(**m, "last", 64);
  engine::ContextOptions mean;
  mean.pooling = "mean";
  ExpectEachAsAlone(**m, "mean", 64, mean);
}

TEST(Embeddings, AnInputLongerThanTheModelTakesFailsAlone) {
  auto m = Model::Load({BertModel(), 0});
  ASSERT_TRUE(m.ok());
  Harness h(m->get());
  Request too_long;
  too_long.id = 1;
  too_long.embed.push_back(std::vector<engine::Token>(600, 1000));  // the model's context is 512
  Request fine;
  fine.id = 2;
  fine.embed.push_back((*m)->Tokenize("hello"));
  auto out = h.Run({too_long, fine});
  EXPECT_EQ(out.at(1).status.code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(out.at(1).embeddings.empty());
  ASSERT_TRUE(out.at(2).status.ok());
  EXPECT_EQ(out.at(2).embeddings.at(0).size(), 128u);
}

}  // namespace
}  // namespace kvb::testing
