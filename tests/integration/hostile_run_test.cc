// `kvbatch run` against hostile input and engine faults, on the real binary:
// a poison request that aborts the process (test hook), a 20,000-level
// schema, an absurd max_tokens with a penalty, and recurrent models
// (mamba, mamba2 from llama.cpp's test-llama-archs) on nested prefixes.
#include <sys/resource.h>
#include <sys/wait.h>

#include <cstdlib>
#include <map>
#include <set>

#include "fixtures.h"

namespace kvb::testing {
namespace {

using nlohmann::json;

std::map<std::string, json> ById(const std::vector<json>& lines) {
  std::map<std::string, json> out;
  for (const json& l : lines) {
    EXPECT_FALSE(out.count(l["custom_id"])) << "answered twice: " << l["custom_id"];
    out[l["custom_id"]] = l;
  }
  return out;
}

std::string RunArgs(const fs::path& dir, const std::string& extra = "") {
  return "run " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " -e " +
         (dir / "err.jsonl").string() + " -m " + TinyModel() + " --threads 1 --max-seqs 4 -q " + extra;
}

// The test-only hook: KVBATCH_TEST_CRASH_ON=<custom_id> aborts the process
// when that request is admitted, as a crash inside llama.cpp would.
int RunWithCrashHook(const std::string& args, const std::string& custom_id, std::string* err) {
  ::setenv("KVBATCH_TEST_CRASH_ON", custom_id.c_str(), 1);
  const int rc = RunKvbatch(args, err);
  ::unsetenv("KVBATCH_TEST_CRASH_ON");
  return rc;
}

TEST(HostileRun, APoisonRequestIsFailedAfterTwoCrashesAndTheRestComplete) {
  fs::path dir = TestDir("poison_run");
  std::vector<json> lines;
  for (int i = 0; i < 24; ++i) lines.push_back(ChatLine("c" + std::to_string(i), Rubric(8), Candidate(i), 4));
  WriteLines(dir / "in.jsonl", lines);
  std::string err;
  // Crash 1: the poison runs in company; crash 2: it runs alone again.
  EXPECT_NE(RunWithCrashHook(RunArgs(dir), "c13", &err), 0) << err;
  EXPECT_NE(RunWithCrashHook(RunArgs(dir), "c13", &err), 0) << err;
  EXPECT_NE(err.find("running when an earlier run crashed"), std::string::npos) << err;
  // The third start fails it instead of running it, and finishes the rest.
  ASSERT_EQ(RunWithCrashHook(RunArgs(dir), "c13", &err), 0) << err;
  auto out = ById(ReadJsonl(dir / "out.jsonl"));
  auto errs = ById(ReadJsonl(dir / "err.jsonl"));
  EXPECT_EQ(out.size(), 23u);
  ASSERT_EQ(errs.size(), 1u);
  ASSERT_TRUE(errs.count("c13"));
  EXPECT_EQ(errs["c13"]["error"]["code"], "request_crashed_engine");
  for (auto& [id, l] : out) EXPECT_EQ(l["response"]["status_code"], 200) << id;
  EXPECT_FALSE(fs::exists(dir / "out.jsonl.inflight")) << "the journal goes once everything is answered";
}

TEST(HostileRun, DeepSchemaAndAbsurdMaxTokensAreAnsweredWithoutCrashingOrBlowingMemory) {
  fs::path dir = TestDir("hostile_lines");
  std::vector<json> lines;
  for (int i = 0; i < 3; ++i) lines.push_back(ChatLine("ok" + std::to_string(i), "Be brief.", Candidate(i), 4));
  json penalty = ChatLine("penalty", "Be brief.", "Say something.", 2147483647);
  penalty["body"]["presence_penalty"] = 0.1;
  penalty["body"]["frequency_penalty"] = 0.1;
  penalty["body"]["temperature"] = 0.7;
  lines.push_back(penalty);
  WriteLines(dir / "in.jsonl", lines);
  std::string schema;
  for (int i = 0; i < 20000; ++i) schema += R"({"type":"array","items":)";
  schema += R"({"type":"string"})" + std::string(20000, '}');
  std::ofstream(dir / "in.jsonl", std::ios::app)
      << R"({"custom_id":"deep","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"a"}],)"
      << R"("response_format":{"type":"json_schema","json_schema":{"name":"n","schema":)" << schema << "}}}}\n";

  std::string err;
  ASSERT_EQ(RunKvbatch(RunArgs(dir, "--skip-invalid --kv-cells 1024"), &err), 0) << err;
  EXPECT_NE(err.find("nested deeper than"), std::string::npos) << err;
  auto out = ById(ReadJsonl(dir / "out.jsonl"));
  auto errs = ById(ReadJsonl(dir / "err.jsonl"));
  EXPECT_EQ(out.size(), 4u);
  ASSERT_TRUE(errs.count("deep"));
  EXPECT_EQ(errs["deep"]["error"]["code"], "json_too_deep");
  ASSERT_TRUE(out.count("penalty"));
  EXPECT_EQ(out["penalty"]["response"]["body"]["choices"][0]["finish_reason"], "length");
  // The penalty window follows what the request can generate (the context),
  // not max_tokens: the children's peak RSS stays small.
  rusage ru{};
  getrusage(RUSAGE_CHILDREN, &ru);
  EXPECT_LT(ru.ru_maxrss, 1024 * 1024) << "peak RSS of a child in KiB";
}

#ifdef KVBATCH_LLAMA_ARCHS_BIN
// A pure recurrent model written by llama.cpp's own test-llama-archs.
std::string ArchModel(const std::string& arch) {
  fs::path dir = fs::path(KVBATCH_TEST_TMP) / ("archs-" + arch + "-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string cmd = std::string(KVBATCH_LLAMA_ARCHS_BIN) + " -a " + arch + " -o " + dir.string() + " >" +
                          (dir / "log.txt").string() + " 2>&1";
  if (std::system(cmd.c_str()) != 0) return "";
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".gguf") return e.path().string();
  return "";
}

// Nested prefixes of different lengths, interleaved (P1, P1+P2a, P1+P2b):
// the file that livelocked mamba models.
void NestedPrefixesAnswerAsAlone(const std::string& arch) {
  const std::string model = ArchModel(arch);
  ASSERT_FALSE(model.empty()) << "test-llama-archs could not write a " << arch << " model";
  fs::path dir = TestDir("recurrent_" + arch);
  const std::string p1(320, 'a');
  std::vector<json> lines;
  for (int i = 0; i < 18; ++i) {
    std::string prompt = p1;
    if (i % 3 == 1) prompt += std::string(240, 'b');
    if (i % 3 == 2) prompt += std::string(240, 'c');
    prompt += "q" + std::to_string(i * 7919);
    lines.push_back({{"custom_id", "r" + std::to_string(i)},
                     {"method", "POST"},
                     {"url", "/v1/completions"},
                     {"body", {{"prompt", prompt}, {"max_tokens", 6}, {"temperature", 0}}}});
  }
  WriteLines(dir / "in.jsonl", lines);
  auto run = [&](const fs::path& in, const fs::path& out) {
    std::string err;
    const int rc = RunKvbatch("run " + in.string() + " -o " + out.string() + " -m " + model +
                                  " --threads 1 --max-seqs 6 --kv-cells 4096 -q",
                              &err);
    EXPECT_EQ(rc, 0) << err;
  };
  run(dir / "in.jsonl", dir / "out.jsonl");
  auto batched = ById(ReadJsonl(dir / "out.jsonl"));
  ASSERT_EQ(batched.size(), lines.size());
  for (const json& l : lines) {
    const std::string id = l["custom_id"];
    WriteLines(dir / "alone.jsonl", {l});
    fs::remove(dir / "alone_out.jsonl");
    run(dir / "alone.jsonl", dir / "alone_out.jsonl");
    auto alone = ReadJsonl(dir / "alone_out.jsonl");
    ASSERT_EQ(alone.size(), 1u);
    ASSERT_EQ(batched[id]["response"]["status_code"], 200) << batched[id].dump();
    EXPECT_EQ(batched[id]["response"]["body"]["choices"][0]["text"], alone[0]["response"]["body"]["choices"][0]["text"])
        << arch << " " << id;
  }
}

TEST(HostileRun, MambaNestedPrefixesAnswerEveryRequestAsAlone) { NestedPrefixesAnswerAsAlone("mamba"); }
TEST(HostileRun, Mamba2NestedPrefixesAnswerEveryRequestAsAlone) { NestedPrefixesAnswerAsAlone("mamba2"); }
#endif

}  // namespace
}  // namespace kvb::testing
