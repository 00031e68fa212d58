// Structured output (response_format) through `kvbatch run` on the tiny
// model: every answer that finished validates against the request's schema;
// an answer cut by max_tokens is reported as "length", never as "stop"; a
// schema the converter cannot handle is a 400 line and the batch goes on.
// And the grammar's allowed-token search (VocabTrie) gives exactly the set
// llama.cpp's own full-vocabulary check gives.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

#include "engine/grammar.h"
#include "engine/model.h"
#include "engine/vocab_trie.h"
#include "fixtures.h"
#include "llama.h"

namespace kvb::testing {
namespace {

using nlohmann::json;

constexpr int kReasonMaxLength = 40;

// The issue's scoring schema; the reason string is bounded (a random-weight
// model rarely closes an unbounded string).
json ScoreSchema() {
  return json::parse(R"({"type":"object",
    "properties":{"score":{"type":"integer","minimum":0,"maximum":100},
                  "verdict":{"type":"string","enum":["hire","maybe","reject"]},
                  "reason":{"type":"string","maxLength":)" +
                     std::to_string(kReasonMaxLength) + R"(}},
    "required":["score","verdict","reason"],"additionalProperties":false})");
}

size_t CodePoints(const std::string& s) {
  return static_cast<size_t>(std::count_if(s.begin(), s.end(), [](char c) { return (c & 0xC0) != 0x80; }));
}

// Empty when `text` is a JSON document valid against ScoreSchema(), else why not.
std::string ValidateScore(const std::string& text) {
  json v = json::parse(text, nullptr, false);
  if (v.is_discarded()) return "not JSON";
  if (!v.is_object()) return "not an object";
  if (v.size() != 3) return "must have exactly score, verdict, reason";
  if (!v.contains("score") || !v["score"].is_number_integer()) return "score is not an integer";
  if (v["score"].get<int64_t>() < 0 || v["score"].get<int64_t>() > 100) return "score out of [0, 100]";
  if (!v.contains("verdict") || !v["verdict"].is_string()) return "verdict is not a string";
  const std::string verdict = v["verdict"];
  if (verdict != "hire" && verdict != "maybe" && verdict != "reject") return "verdict not in the enum";
  if (!v.contains("reason") || !v["reason"].is_string()) return "reason is not a string";
  if (CodePoints(v["reason"].get<std::string>()) > kReasonMaxLength) return "reason longer than maxLength";
  return "";
}

json SchemaLine(int i, int max_tokens, double temperature, const json& schema) {
  json line = ChatLine("score-" + std::to_string(i), "Score the candidate from 0 to 100. Answer in JSON.",
                       Candidate(i), max_tokens, temperature);
  line["body"]["response_format"] = {{"type", "json_schema"},
                                     {"json_schema", {{"name", "score"}, {"schema", schema}, {"strict", true}}}};
  return line;
}

// Runs the lines; returns the output lines by custom_id. One thread: the
// tiny model gains nothing from two, and an idle-spinning second thread
// costs a lot on a busy 2-core machine.
std::map<std::string, json> RunLines(const std::string& name, const std::vector<json>& lines) {
  fs::path dir = TestDir(name);
  WriteLines(dir / "in.jsonl", lines);
  std::string err;
  const int rc = RunKvbatch("run " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " -m " +
                                TinyModel() + " -q --threads 1",
                            &err);
  EXPECT_EQ(rc, 0) << err;
  std::map<std::string, json> out;
  for (auto& l : ReadJsonl(dir / "out.jsonl")) out[l["custom_id"]] = l;
  return out;
}

TEST(StructuredOutput, ScoringBatchOf200EveryFinishedAnswerValidatesAgainstTheSchema) {
  std::vector<json> lines;
  const double temps[] = {0.0, 0.7, 1.0};
  for (int i = 0; i < 200; ++i) lines.push_back(SchemaLine(i, 96, temps[i % 3], ScoreSchema()));
  auto out = RunLines("schema200", lines);
  ASSERT_EQ(out.size(), 200u);
  int stop = 0, length = 0;
  std::map<std::string, int> verdicts;
  for (auto& [id, l] : out) {
    ASSERT_EQ(l["response"]["status_code"], 200) << l.dump();
    const json& c = l["response"]["body"]["choices"][0];
    const std::string text = c["message"]["content"];
    if (c["finish_reason"] == "stop") {
      ++stop;
      EXPECT_EQ(ValidateScore(text), "") << id << ": " << text;
      // The grammar's output is valid UTF-8 as generated: nothing had to be replaced.
      EXPECT_EQ(text.find("\xEF\xBF\xBD"), std::string::npos) << id << ": " << text;
      if (ValidateScore(text).empty()) ++verdicts[json::parse(text)["verdict"].get<std::string>()];
    } else {
      ASSERT_EQ(c["finish_reason"], "length");
      ++length;
    }
  }
  std::printf("[ report ] schema batch: %d of 200 finished (all valid), %d cut by max_tokens; verdicts hire %d maybe %d reject %d\n",
              stop, length, verdicts["hire"], verdicts["maybe"], verdicts["reject"]);
  EXPECT_GE(stop, 180);  // bounded strings: nearly every answer completes in 96 tokens
  EXPECT_GE(verdicts.size(), 2u);  // the answers are sampled, not one fixed text
}

TEST(StructuredOutput, AnswerCutByMaxTokensIsReportedAsLength) {
  std::vector<json> lines;
  for (int i = 0; i < 10; ++i) lines.push_back(SchemaLine(i, 6, 1.0, ScoreSchema()));
  auto out = RunLines("schema-cut", lines);
  ASSERT_EQ(out.size(), 10u);
  for (auto& [id, l] : out) {
    const json& c = l["response"]["body"]["choices"][0];
    EXPECT_EQ(c["finish_reason"], "length") << c.dump();
    EXPECT_NE(ValidateScore(c["message"]["content"]), "") << "an incomplete answer cannot validate";
  }
}

TEST(StructuredOutput, JsonObjectAnswersParseAsObjects) {
  std::vector<json> lines;
  for (int i = 0; i < 40; ++i) {
    json line = ChatLine("obj-" + std::to_string(i), "Answer in JSON.", Candidate(i), 200, 1.0);
    line["body"]["response_format"] = {{"type", "json_object"}};
    lines.push_back(line);
  }
  auto out = RunLines("json-object", lines);
  ASSERT_EQ(out.size(), 40u);
  int stop = 0;
  for (auto& [id, l] : out) {
    const json& c = l["response"]["body"]["choices"][0];
    const std::string text = c["message"]["content"];
    ASSERT_FALSE(text.empty());
    EXPECT_EQ(text.find_first_not_of(" \t\n"), text.find('{')) << "must start as an object: " << text;
    if (c["finish_reason"] != "stop") continue;
    ++stop;
    json v = json::parse(text, nullptr, false);
    EXPECT_TRUE(!v.is_discarded() && v.is_object()) << id << ": " << text;
  }
  std::printf("[ report ] json_object: %d of 40 finished within 200 tokens (a random model rarely closes strings)\n", stop);
  EXPECT_GE(stop, 1);
}

TEST(StructuredOutput, UnsupportedSchemaIsA400LineAndTheBatchGoesOn) {
  std::vector<json> lines;
  for (int i = 0; i < 6; ++i) lines.push_back(SchemaLine(i, 96, 0.0, ScoreSchema()));
  lines[2] = SchemaLine(2, 96, 0.0, json{{"$ref", "#/definitions/missing"}});
  lines[4] = SchemaLine(4, 96, 0.0, json::parse(R"({"type":"object","properties":{"a":{"$ref":"https://example.com/x.json"}}})"));
  auto out = RunLines("schema-bad", lines);
  ASSERT_EQ(out.size(), 6u);
  for (int i = 0; i < 6; ++i) {
    const json& l = out["score-" + std::to_string(i)];
    if (i == 2 || i == 4) {
      EXPECT_EQ(l["response"]["status_code"], 400) << l.dump();
      const json& e = l["response"]["body"]["error"];
      EXPECT_EQ(e["param"], "response_format");
      EXPECT_EQ(e["code"], "invalid_request");
      EXPECT_NE(e["message"].get<std::string>().find("unsupported JSON schema"), std::string::npos) << e.dump();
      EXPECT_NE(e["message"].get<std::string>().find("$ref"), std::string::npos) << e.dump();
    } else {
      EXPECT_EQ(l["response"]["status_code"], 200) << l.dump();
    }
  }
}

// VocabTrie is an optimisation of llama.cpp's grammar check: along random
// walks through the grammar, its allowed set equals the full check's.
TEST(VocabTrie, AllowedTokensEqualTheGrammarsFullVocabularyCheck) {
  auto model = engine::Model::Load({TinyModel(), 0});
  ASSERT_TRUE(model.ok());
  const llama_vocab* vocab = (*model)->vocab();
  auto trie = engine::VocabTrie::Build(vocab);
  const int32_t n_vocab = llama_vocab_n_tokens(vocab);
  auto score = engine::JsonSchemaToGrammar(ScoreSchema().dump());
  auto object = engine::JsonObjectGrammar();
  ASSERT_TRUE(score.ok() && object.ok());
  std::mt19937 rng(7);
  int steps = 0;
  for (const std::string* gbnf : {&*score, &*object}) {
    for (int walk = 0; walk < 4; ++walk) {
      llama_sampler* g = llama_sampler_init_grammar(vocab, gbnf->c_str(), "root");
      ASSERT_NE(g, nullptr);
      for (int step = 0; step < 40; ++step, ++steps) {
        std::vector<engine::Token> fast;
        trie->Allowed(g, &fast);
        std::sort(fast.begin(), fast.end());
        std::vector<llama_token_data> all(n_vocab);
        for (int32_t i = 0; i < n_vocab; ++i) all[i] = {i, 0.0f, 0.0f};
        llama_token_data_array arr{all.data(), all.size(), -1, false};
        llama_sampler_apply(g, &arr);
        std::vector<engine::Token> full;
        for (const auto& d : all)
          if (d.logit == 0.0f) full.push_back(d.id);
        ASSERT_EQ(fast, full) << "walk " << walk << " step " << step;
        // Prefer short tokens (structure) half of the time, any allowed token otherwise.
        std::vector<engine::Token> pick;
        for (engine::Token t : full)
          if (!llama_vocab_is_eog(vocab, t)) pick.push_back(t);
        if (pick.empty()) break;
        engine::Token t = pick[std::uniform_int_distribution<size_t>(0, pick.size() - 1)(rng)];
        llama_sampler_accept(g, t);
      }
      llama_sampler_free(g);
    }
  }
  EXPECT_GT(steps, 100);
}

}  // namespace
}  // namespace kvb::testing
