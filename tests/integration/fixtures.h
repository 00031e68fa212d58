// Shared helpers for integration tests: the generated tiny model, temp
// directories, and running the real kvbatch binary.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "tools/gen_model.h"

namespace kvb::testing {

namespace fs = std::filesystem;

inline fs::path TestDir(const std::string& name) {
  fs::path dir = fs::path(KVBATCH_TEST_TMP) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// The tiny model, generated once per test process (ctest runs tests as
// parallel processes: each has its own file, removed at exit). Named
// tiny.gguf inside a per-process folder, so responses name the model "tiny".
inline const std::string& TinyModel() {
  struct Holder {
    fs::path dir;
    std::string path;
    ~Holder() {
      std::error_code ec;
      if (!dir.empty()) fs::remove_all(dir, ec);
    }
  };
  static Holder holder;
  static std::once_flag once;
  std::call_once(once, [] {
    holder.dir = fs::path(KVBATCH_TEST_TMP) / ("model-" + std::to_string(::getpid()));
    fs::create_directories(holder.dir);
    auto opts = tools::ModelPreset("tiny");
    opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/ggml-vocab-llama-spm.gguf";
    opts->out_path = (holder.dir / "tiny.gguf").string();
    Status st = tools::GenerateModel(*opts);
    if (!st.ok()) throw std::runtime_error(st.ToString());
    holder.path = opts->out_path;
  });
  return holder.path;
}

// Runs `reqs` through a fresh engine on `model` until each has its Result.
// They are submitted at once, so which requests share an anchor does not
// depend on thread timing.
inline std::map<uint64_t, engine::Result> RunEngine(const engine::Model& model, const std::vector<engine::Request>& reqs,
                                                    const engine::EngineOptions& opts) {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, engine::Result> results;
  auto eng = engine::Engine::Start(&model, opts, [&](engine::Result&& r) {
    std::lock_guard<std::mutex> lock(mu);
    results[r.id] = std::move(r);
    cv.notify_all();
  });
  EXPECT_TRUE(eng.ok()) << eng.status().ToString();
  if (!eng.ok()) return {};
  (*eng)->SubmitAll(reqs);  // at once: the scheduler sees them together, as a batch's are
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(300), [&] { return results.size() >= reqs.size(); }));
  }
  (*eng).reset();  // stopped before `results` goes away
  return results;
}

// Runs the kvbatch binary; returns its exit status (-signal if killed).
inline int RunKvbatch(const std::string& args, std::string* stderr_text = nullptr) {
  std::string err = (fs::path(KVBATCH_TEST_TMP) / ("stderr-" + std::to_string(::getpid()) + ".txt")).string();
  std::string cmd = std::string(KVBATCH_BIN) + " " + args + " 2>" + err;
  int rc = std::system(cmd.c_str());
  if (stderr_text) {
    std::ifstream f(err);
    stderr_text->assign(std::istreambuf_iterator<char>(f), {});
  }
  if (WIFEXITED(rc)) return WEXITSTATUS(rc);
  return -1;
}

inline std::vector<nlohmann::json> ReadJsonl(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

inline void WriteLines(const fs::path& p, const std::vector<nlohmann::json>& lines) {
  std::ofstream f(p);
  for (const auto& l : lines) f << l.dump() << "\n";
}

// A long shared "rubric" system prompt and a short unique user message.
inline std::string Rubric(int repeat) {
  std::string s = "You score job candidates for a senior backend role. ";
  for (int i = 0; i < repeat; ++i)
    s += "Criterion " + std::to_string(i) + ": weigh experience with distributed systems, databases and on-call work. ";
  return s;
}

inline nlohmann::json ChatLine(const std::string& id, const std::string& system, const std::string& user,
                               int max_tokens, double temperature = 0.0) {
  return {{"custom_id", id},
          {"method", "POST"},
          {"url", "/v1/chat/completions"},
          {"body",
           {{"model", "any"},
            {"messages", {{{"role", "system"}, {"content", system}}, {{"role", "user"}, {"content", user}}}},
            {"max_tokens", max_tokens},
            {"temperature", temperature}}}};
}

inline std::string Candidate(int i) {
  static const char* names[] = {"Ada", "Grace", "Linus", "Ken", "Barbara", "Edsger", "Donald", "Margaret"};
  static const char* skills[] = {"Rust and Kafka", "Postgres tuning", "Go microservices", "C++ trading systems",
                                 "Python data pipelines", "Kubernetes operations", "Java payments", "Erlang telecom"};
  return std::string("Candidate ") + names[i % 8] + " #" + std::to_string(i) + ": " + std::to_string(3 + i % 17) +
         " years, strongest in " + skills[(i * 5) % 8] + ", lives in timezone UTC+" + std::to_string(i % 12) + ".";
}

// A chat request on `model`: the shared rubric (repeated `rubric` times) as
// the system message, candidate `i` as the user message.
inline engine::Request RubricRequest(const engine::Model& model, int i, int rubric, int max_tokens,
                                     float temperature) {
  auto prompt = model.FormatChat({{"system", Rubric(rubric)}, {"user", Candidate(i)}});
  EXPECT_TRUE(prompt.ok());
  engine::Request r;
  r.id = static_cast<uint64_t>(i);
  r.prompt = model.Tokenize(prompt.ok() ? *prompt : "");
  r.sampling.temperature = temperature;
  r.sampling.max_tokens = max_tokens;
  return r;
}

// Layers of the suites' tiny model on a GPU: 0 (the CPU) unless
// KVBATCH_TEST_GPU_LAYERS says otherwise (-1: all), which runs the same
// checks on a GPU build of llama.cpp (bench/gpu_remote.sh's tests phase).
inline int32_t TestGpuLayers() {
  const char* env = std::getenv("KVBATCH_TEST_GPU_LAYERS");
  return env && *env ? static_cast<int32_t>(std::strtol(env, nullptr, 10)) : 0;
}

// A suite whose tests share the tiny model, loaded once (model_).
class TinyModelSuite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = engine::Model::Load({TinyModel(), TestGpuLayers()});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(m).value().release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  static inline engine::Model* model_ = nullptr;
};

}  // namespace kvb::testing
