// `kvbatch run` end to end: the real binary on the generated tiny model.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <map>
#include <set>
#include <thread>

#include "fixtures.h"

extern char** environ;

namespace kvb::testing {
namespace {

std::vector<nlohmann::json> RubricBatch(int n, int max_tokens) {
  std::vector<nlohmann::json> lines;
  const std::string rubric = Rubric(12);
  for (int i = 0; i < n; ++i) lines.push_back(ChatLine("cand-" + std::to_string(i), rubric, Candidate(i), max_tokens));
  return lines;
}

std::string Content(const nlohmann::json& line) {
  return line["response"]["body"]["choices"][0]["message"]["content"].get<std::string>();
}

// `kvbatch run dir/in.jsonl -o dir/out.jsonl -e dir/err.jsonl -m tiny` plus `extra`.
int RunIn(const fs::path& dir, std::string* err, const std::string& extra = "") {
  return RunKvbatch("run " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " -e " +
                        (dir / "err.jsonl").string() + " -m " + TinyModel() + " " + extra,
                    err);
}

size_t CountLines(const fs::path& p) {
  std::ifstream f(p);
  return static_cast<size_t>(std::count(std::istreambuf_iterator<char>(f), {}, '\n'));
}

TEST(RunCommand, AnswersEveryLineInInputOrderWithCachedTokensReported) {
  auto dir = TestDir("run_basic");
  auto lines = RubricBatch(30, 6);
  lines.push_back({{"custom_id", "raw"},
                   {"method", "POST"},
                   {"url", "/v1/completions"},
                   {"body", {{"model", "x"}, {"prompt", "Once upon a time"}, {"max_tokens", 5}, {"temperature", 0}}}});
  WriteLines(dir / "in.jsonl", lines);
  std::string err;
  ASSERT_EQ(RunIn(dir, &err), 0) << err;
  auto out = ReadJsonl(dir / "out.jsonl");
  ASSERT_EQ(out.size(), lines.size());
  EXPECT_EQ(CountLines(dir / "err.jsonl"), 0u);
  int cached = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i]["custom_id"], lines[i]["custom_id"]);  // input order restored
    EXPECT_EQ(out[i]["response"]["status_code"], 200);
    EXPECT_TRUE(out[i]["error"].is_null());
    const auto& body = out[i]["response"]["body"];
    EXPECT_EQ(body["model"], "tiny");  // the model actually used
    cached += body["usage"]["prompt_tokens_details"]["cached_tokens"].get<int>() > 0;
  }
  EXPECT_EQ(out.back()["response"]["body"]["object"], "text_completion");
  EXPECT_EQ(out[0]["response"]["body"]["object"], "chat.completion");
  // All but the first of the rubric group; the raw completion shares only
  // the BOS token with them, which is also served from the cache.
  EXPECT_EQ(cached, 30);
  EXPECT_EQ(out[0]["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  EXPECT_NE(err.find("served from shared prefixes"), std::string::npos) << err;
}

TEST(RunCommand, PromptLongerThanTheContextIsA400AndTheRestComplete) {
  auto dir = TestDir("run_too_long");
  auto lines = RubricBatch(5, 4);
  std::string huge;
  for (int i = 0; i < 1500; ++i) huge += "lorem ipsum dolor ";
  lines.insert(lines.begin() + 2, ChatLine("too-long", "sys", huge, 4));
  WriteLines(dir / "in.jsonl", lines);
  std::string err;
  ASSERT_EQ(RunIn(dir, &err), 0) << err;
  auto out = ReadJsonl(dir / "out.jsonl");
  auto errs = ReadJsonl(dir / "err.jsonl");
  EXPECT_EQ(out.size(), 5u);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0]["custom_id"], "too-long");
  EXPECT_EQ(errs[0]["response"]["status_code"], 400);
  EXPECT_EQ(errs[0]["response"]["body"]["error"]["code"], "context_length_exceeded");
  EXPECT_NE(errs[0]["response"]["body"]["error"]["message"].get<std::string>().find("context"), std::string::npos);
}

TEST(RunCommand, InvalidInputStopsBeforeRunningAndListsEveryLine) {
  auto dir = TestDir("run_invalid");
  std::ofstream f(dir / "in.jsonl");
  f << ChatLine("a", "s", "u", 3).dump() << "\n";
  f << "{not json\n";
  f << ChatLine("a", "s", "u", 3).dump() << "\n";  // duplicate custom_id
  f << R"({"custom_id":"c","method":"GET","url":"/v1/chat/completions","body":{}})" << "\n";
  f << R"({"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":{"messages":"hi"}})" << "\n";
  f << ChatLine("e", "s", "u", 3).dump() << "\n";
  f.close();
  std::string err;
  EXPECT_EQ(RunKvbatch("run " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " -m " +
                           TinyModel(),
                       &err),
            2);
  for (const char* needle : {":2:", ":3:", ":4:", ":5:"}) EXPECT_NE(err.find(needle), std::string::npos) << needle << "\n" << err;
  EXPECT_EQ(err.find(":1:"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir / "out.jsonl"));

  // --skip-invalid: the valid lines run, the invalid ones go to the error file.
  ASSERT_EQ(RunIn(dir, &err, "--skip-invalid"), 0) << err;
  auto out = ReadJsonl(dir / "out.jsonl");
  auto errs = ReadJsonl(dir / "err.jsonl");
  std::set<std::string> ok_ids, err_ids;
  for (auto& l : out) ok_ids.insert(l["custom_id"]);
  for (auto& l : errs) err_ids.insert(l["custom_id"]);
  EXPECT_EQ(ok_ids, (std::set<std::string>{"a", "e"}));
  EXPECT_EQ(err_ids, (std::set<std::string>{"c", "d"}));
  for (auto& l : errs) EXPECT_FALSE(l["error"]["message"].get<std::string>().empty());

  // Rerunning the finished command changes nothing: every id stays once.
  ASSERT_EQ(RunIn(dir, &err, "--skip-invalid"), 0) << err;
  EXPECT_EQ(ReadJsonl(dir / "out.jsonl").size(), 2u);
  EXPECT_EQ(ReadJsonl(dir / "err.jsonl").size(), 2u);
}

// kill -9 mid-run, rerun the same command: every custom_id exactly once, and
// the same answers as a run that was never interrupted.
TEST(RunCommand, ResumesAfterKill9WithoutLosingOrRepeatingWork) {
  auto dir = TestDir("run_resume");
  // Each user message starts with its own character, so every request forks
  // the same anchor (the rubric) and prefills the same suffix in either run,
  // and one sequence at a time keeps the batch shapes identical too: answers
  // can then be compared exactly. (llama.cpp's CPU kernels are not bitwise
  // batch-invariant; across batch shapes only near-tie tokens could flip,
  // see SharedPrefix.BatchedLogitsMatchEachRequestRunAlone.)
  const std::string leads = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  std::vector<nlohmann::json> lines;
  for (size_t i = 0; i < leads.size(); ++i)
    lines.push_back(ChatLine("cand-" + std::to_string(i), Rubric(12), std::string(1, leads[i]) + ": " + Candidate(int(i)), 64));
  WriteLines(dir / "in.jsonl", lines);
  // One engine thread: ctest runs tests side by side on two cores, and
  // llama.cpp's spinning threads slow down badly when oversubscribed.
  const std::string common = " -m " + TinyModel() + " --max-seqs 1 --threads 1 -q";
  std::string err;
  ASSERT_EQ(RunKvbatch("run " + (dir / "in.jsonl").string() + " -o " + (dir / "ref.jsonl").string() + common, &err), 0)
      << err;

  const std::string out = (dir / "out.jsonl").string();
  std::vector<std::string> args = {KVBATCH_BIN, "run", (dir / "in.jsonl").string(), "-o", out, "-m", TinyModel(),
                                   "--max-seqs", "1", "--threads", "1", "-q"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  ASSERT_EQ(posix_spawn(&pid, KVBATCH_BIN, nullptr, nullptr, argv.data(), environ), 0);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (CountLines(out) < 8 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the run finished before it could be killed";
  const size_t before = CountLines(out);
  ASSERT_LT(before, lines.size());

  ASSERT_EQ(RunKvbatch("run " + (dir / "in.jsonl").string() + " -o " + out + common, &err), 0) << err;
  auto ref = ReadJsonl(dir / "ref.jsonl");
  auto got = ReadJsonl(out);
  ASSERT_EQ(got.size(), lines.size());
  std::map<std::string, std::string> ref_text;
  for (auto& l : ref) ref_text[l["custom_id"]] = Content(l);
  std::set<std::string> seen;
  for (size_t i = 0; i < got.size(); ++i) {
    const std::string id = got[i]["custom_id"];
    EXPECT_TRUE(seen.insert(id).second) << "answered twice: " << id;
    EXPECT_EQ(id, lines[i]["custom_id"].get<std::string>());
    EXPECT_EQ(Content(got[i]), ref_text[id]) << id;
  }
  std::printf("[ report ] killed after %zu of %zu lines; resumed run completed the rest\n", before, lines.size());
}

TEST(RunCommand, TornLastLineIsRepairedOnResume) {
  auto dir = TestDir("run_torn");
  auto lines = RubricBatch(6, 4);
  WriteLines(dir / "in.jsonl", lines);
  std::string err;
  const std::string args = "run " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " -m " +
                           TinyModel() + " -q";
  ASSERT_EQ(RunKvbatch(args, &err), 0) << err;
  auto full = ReadJsonl(dir / "out.jsonl");
  // Keep 3 complete lines and half of the 4th, as a crash mid-write would.
  {
    std::string first3;
    for (int i = 0; i < 3; ++i) first3 += full[i].dump() + "\n";
    std::string half = full[3].dump().substr(0, 40);
    std::ofstream f(dir / "out.jsonl", std::ios::trunc);
    f << first3 << half;
  }
  ASSERT_EQ(RunKvbatch(args, &err), 0) << err;
  auto got = ReadJsonl(dir / "out.jsonl");
  ASSERT_EQ(got.size(), 6u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i]["id"], full[i]["id"]);  // kept, not redone
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(got[i]["custom_id"], lines[i]["custom_id"]);
}

}  // namespace
}  // namespace kvb::testing
