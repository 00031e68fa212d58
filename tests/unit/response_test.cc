#include "batch/response.h"

#include <gtest/gtest.h>

#include <limits>
#include <set>
#include <string>

namespace kvb::batch {
namespace {

using nlohmann::json;

engine::Result SampleResult() {
  engine::Result r;
  r.text = "Score: 7";
  r.finish = engine::FinishReason::kLength;
  r.prompt_tokens = 2050;
  r.cached_tokens = 2000;
  r.completion_tokens = 12;
  return r;
}

void ExpectUsage(const json& usage) {
  EXPECT_EQ(usage["prompt_tokens"], 2050);
  EXPECT_EQ(usage["completion_tokens"], 12);
  EXPECT_EQ(usage["total_tokens"], 2062);
  EXPECT_EQ(usage["prompt_tokens_details"]["cached_tokens"], 2000);
  EXPECT_EQ(usage["completion_tokens_details"]["reasoning_tokens"], 0);
}

bool IsHex(const std::string& s) { return s.find_first_not_of("0123456789abcdef") == std::string::npos; }

TEST(ChatCompletionBody, HasEveryOpenAIField) {
  json b = ChatCompletionBody(SampleResult(), "tiny-model", 1700000000, "chatcmpl-abc");
  EXPECT_EQ(b["id"], "chatcmpl-abc");
  EXPECT_EQ(b["object"], "chat.completion");
  EXPECT_EQ(b["created"], 1700000000);
  EXPECT_EQ(b["model"], "tiny-model");
  ASSERT_TRUE(b["choices"].is_array());
  ASSERT_EQ(b["choices"].size(), 1u);
  const json& c = b["choices"][0];
  EXPECT_EQ(c["index"], 0);
  EXPECT_EQ(c["message"]["role"], "assistant");
  EXPECT_EQ(c["message"]["content"], "Score: 7");
  ASSERT_TRUE(c["message"].contains("refusal"));
  EXPECT_TRUE(c["message"]["refusal"].is_null());
  ASSERT_TRUE(c.contains("logprobs"));
  EXPECT_TRUE(c["logprobs"].is_null());
  EXPECT_EQ(c["finish_reason"], "length");
  ExpectUsage(b["usage"]);
  ASSERT_TRUE(b.contains("system_fingerprint"));
  EXPECT_TRUE(b["system_fingerprint"].is_null());
  EXPECT_EQ(ChatCompletionBody(SampleResult(), "m", 1, "x", "fp_1")["system_fingerprint"], "fp_1");
}

engine::Result TwoChoicesWithLogprobs() {
  engine::Result r = SampleResult();
  r.logprobs = true;
  for (int i = 0; i < 2; ++i) {
    engine::Choice c;
    c.text = i == 0 ? "ab\xc3" : "z";
    c.finish = i == 0 ? engine::FinishReason::kLength : engine::FinishReason::kStop;
    engine::TokenLogprob a;
    a.token = 5, a.piece = i == 0 ? "ab" : "z", a.logprob = -0.5f;
    a.top = {{5, a.piece, -0.5f}, {6, "q", -1.25f}};
    c.tokens.push_back(5);
    c.logprobs.push_back(a);
    if (i == 0) {
      engine::TokenLogprob b;
      b.token = 7, b.piece = "\xc3", b.logprob = -std::numeric_limits<float>::infinity();
      c.tokens.push_back(7);
      c.logprobs.push_back(b);
    }
    r.choices.push_back(c);
  }
  r.text = r.choices[0].text;
  return r;
}

TEST(ChatCompletionBody, ChoicesAndLogprobsInOpenAIShape) {
  json b = ChatCompletionBody(TwoChoicesWithLogprobs(), "m", 1, "x");
  ASSERT_EQ(b["choices"].size(), 2u);
  EXPECT_EQ(b["choices"][1]["index"], 1);
  EXPECT_EQ(b["choices"][1]["message"]["content"], "z");
  EXPECT_EQ(b["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(b["choices"][1]["finish_reason"], "stop");
  const json& lp = b["choices"][0]["logprobs"];
  EXPECT_TRUE(lp["refusal"].is_null());
  ASSERT_EQ(lp["content"].size(), 2u);
  const json& t0 = lp["content"][0];
  EXPECT_EQ(t0["token"], "ab");
  EXPECT_DOUBLE_EQ(t0["logprob"].get<double>(), -0.5);
  EXPECT_EQ(t0["bytes"], json::array({97, 98}));
  ASSERT_EQ(t0["top_logprobs"].size(), 2u);
  EXPECT_EQ(t0["top_logprobs"][1]["token"], "q");
  EXPECT_DOUBLE_EQ(t0["top_logprobs"][1]["logprob"].get<double>(), -1.25);
  EXPECT_EQ(t0["top_logprobs"][1]["bytes"], json::array({113}));
  // Part of a UTF-8 character: the token string is valid UTF-8, the bytes are raw.
  const json& t1 = lp["content"][1];
  EXPECT_EQ(t1["token"], "\xEF\xBF\xBD");
  EXPECT_EQ(t1["bytes"], json::array({0xc3}));
  EXPECT_DOUBLE_EQ(t1["logprob"].get<double>(), -9999.0);
  EXPECT_TRUE(ChatCompletionBody(SampleResult(), "m", 1, "x")["choices"][0]["logprobs"].is_null());
}

TEST(TextCompletionBody, LegacyLogprobsShape) {
  json b = TextCompletionBody(TwoChoicesWithLogprobs(), "m", 1, "x");
  ASSERT_EQ(b["choices"].size(), 2u);
  const json& lp = b["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json::array({"ab", "\xEF\xBF\xBD"}));
  EXPECT_DOUBLE_EQ(lp["token_logprobs"][0].get<double>(), -0.5);
  EXPECT_DOUBLE_EQ(lp["top_logprobs"][0]["q"].get<double>(), -1.25);
  EXPECT_EQ(lp["text_offset"], json::array({0, 2}));
}

TEST(ChatCompletionBody, FinishReasonStop) {
  engine::Result r = SampleResult();
  r.finish = engine::FinishReason::kStop;
  EXPECT_EQ(ChatCompletionBody(r, "m", 1, "x")["choices"][0]["finish_reason"], "stop");
}

TEST(TextCompletionBody, HasEveryOpenAIField) {
  json b = TextCompletionBody(SampleResult(), "tiny-model", 1700000001, "cmpl-xyz");
  EXPECT_EQ(b["id"], "cmpl-xyz");
  EXPECT_EQ(b["object"], "text_completion");
  EXPECT_EQ(b["created"], 1700000001);
  EXPECT_EQ(b["model"], "tiny-model");
  ASSERT_EQ(b["choices"].size(), 1u);
  const json& c = b["choices"][0];
  EXPECT_EQ(c["text"], "Score: 7");
  EXPECT_EQ(c["index"], 0);
  ASSERT_TRUE(c.contains("logprobs"));
  EXPECT_TRUE(c["logprobs"].is_null());
  EXPECT_EQ(c["finish_reason"], "length");
  ExpectUsage(b["usage"]);
}

TEST(ErrorBody, HasMessageTypeParamCode) {
  json e = ErrorBody("bad temperature", "invalid_request_error", "temperature", "invalid_value");
  EXPECT_EQ(e["error"]["message"], "bad temperature");
  EXPECT_EQ(e["error"]["type"], "invalid_request_error");
  EXPECT_EQ(e["error"]["param"], "temperature");
  EXPECT_EQ(e["error"]["code"], "invalid_value");
  json n = ErrorBody("boom", "server_error", "", "");
  EXPECT_TRUE(n["error"]["param"].is_null());
  EXPECT_TRUE(n["error"]["code"].is_null());
}

TEST(SuccessLine, ParsesBackWithEnvelope) {
  json body = ChatCompletionBody(SampleResult(), "m", 5, "chatcmpl-1");
  std::string line = SuccessLine("cv-17", body);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  json j = json::parse(line);
  EXPECT_EQ(j["custom_id"], "cv-17");
  EXPECT_EQ(j["id"].get<std::string>().rfind("batch_req_", 0), 0u);
  EXPECT_EQ(j["response"]["status_code"], 200);
  EXPECT_EQ(j["response"]["request_id"].get<std::string>().rfind("req_", 0), 0u);
  EXPECT_EQ(j["response"]["body"], body);
  ASSERT_TRUE(j.contains("error"));
  EXPECT_TRUE(j["error"].is_null());
  // OpenAI's key order for the envelope.
  EXPECT_EQ(line.rfind("{\"id\":\"batch_req_", 0), 0u);
}

TEST(FailureLine, CarriesStatusCodeAndErrorBody) {
  json err = ErrorBody("n must be 1", "invalid_request_error", "n", "");
  json j = json::parse(FailureLine("cv-18", 400, err));
  EXPECT_EQ(j["custom_id"], "cv-18");
  EXPECT_EQ(j["response"]["status_code"], 400);
  EXPECT_EQ(j["response"]["body"], err);
  EXPECT_TRUE(j["error"].is_null());
}

TEST(RequestErrorLine, HasNullResponseAndCodeMessage) {
  json j = json::parse(RequestErrorLine("cv-19", "batch_cancelled", "the batch was cancelled"));
  EXPECT_EQ(j["custom_id"], "cv-19");
  EXPECT_TRUE(j["response"].is_null());
  EXPECT_EQ(j["error"]["code"], "batch_cancelled");
  EXPECT_EQ(j["error"]["message"], "the batch was cancelled");
  EXPECT_EQ(j["id"].get<std::string>().rfind("batch_req_", 0), 0u);
}

TEST(NewId, PrefixedUniqueHex) {
  std::set<std::string> seen;
  for (int i = 0; i < 2000; ++i) {
    std::string id = NewId("batch_req_");
    ASSERT_EQ(id.size(), 10u + 24u);
    ASSERT_EQ(id.rfind("batch_req_", 0), 0u);
    ASSERT_TRUE(IsHex(id.substr(10))) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 2000u);
}

TEST(ResponseUtf8, InvalidModelTextDoesNotThrow) {
  engine::Result r = SampleResult();
  r.text = "ok \xE2\x82 cut \xff\xfe end \xF0\x9F\x98";  // truncated multibyte + stray bytes
  json body;
  ASSERT_NO_THROW(body = ChatCompletionBody(r, "m", 1, "x"));
  std::string dumped;
  ASSERT_NO_THROW(dumped = body.dump());  // even a default dump is safe: text was sanitized
  std::string line;
  ASSERT_NO_THROW(line = SuccessLine("id\xff", body));
  json back = json::parse(line);
  std::string content = back["response"]["body"]["choices"][0]["message"]["content"];
  EXPECT_EQ(content.rfind("ok ", 0), 0u);
  EXPECT_NE(content.find("\xEF\xBF\xBD"), std::string::npos);
  EXPECT_NO_THROW(TextCompletionBody(r, "m\xc0", 1, "x").dump());
  EXPECT_NO_THROW(json::parse(RequestErrorLine("a", "c", "bad \xc3")));
}

TEST(ResponseUtf8, ValidTextIsUnchangedAndInvalidSequencesReplaced) {
  std::string valid = "plain, \xC3\xA9, \xE2\x82\xAC, \xF0\x9F\x98\x80";
  EXPECT_EQ(ToValidUtf8(valid), valid);
  EXPECT_EQ(ToValidUtf8("a\xff"
                        "b"),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(ToValidUtf8("\xE2\x82"), "\xEF\xBF\xBD");              // truncated sequence: one replacement
  EXPECT_EQ(ToValidUtf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong encoding
  EXPECT_EQ(ToValidUtf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
}

}  // namespace
}  // namespace kvb::batch
