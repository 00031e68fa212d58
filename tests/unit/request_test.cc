#include "batch/request.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

namespace kvb::batch {
namespace {

using nlohmann::json;

json ChatLine(const std::string& id = "req-1") {
  return json{{"custom_id", id},
              {"method", "POST"},
              {"url", "/v1/chat/completions"},
              {"body", json{{"model", "m"},
                            {"messages", json::array({json{{"role", "system"}, {"content", "You grade CVs."}},
                                                      json{{"role", "user"}, {"content", "Alice"}}})}}}};
}

json CompletionLine(const std::string& id = "req-1") {
  return json{{"custom_id", id},
              {"method", "POST"},
              {"url", "/v1/completions"},
              {"body", json{{"model", "m"}, {"prompt", "Once upon a time"}}}};
}

LineError ExpectError(const std::string& text, int64_t line_no = 7) {
  auto r = ValidateLine(text, line_no);
  EXPECT_TRUE(std::holds_alternative<LineError>(r)) << text;
  if (!std::holds_alternative<LineError>(r)) return {};
  LineError e = std::get<LineError>(r);
  EXPECT_EQ(e.line, line_no);
  EXPECT_FALSE(e.message.empty());
  return e;
}

LineInfo ExpectValid(const json& line) {
  auto r = ValidateLine(line.dump(), 1);
  EXPECT_TRUE(std::holds_alternative<LineInfo>(r))
      << (std::holds_alternative<LineError>(r) ? std::get<LineError>(r).message : "");
  return std::holds_alternative<LineInfo>(r) ? std::get<LineInfo>(r) : LineInfo{};
}

// ---- ValidateLine: structure ---------------------------------------------------

TEST(ValidateLine, AcceptsChatLine) {
  LineInfo info = ExpectValid(ChatLine("abc"));
  EXPECT_EQ(info.custom_id, "abc");
  EXPECT_EQ(info.endpoint, Endpoint::kChatCompletions);
}

TEST(ValidateLine, AcceptsCompletionsLine) {
  LineInfo info = ExpectValid(CompletionLine("c1"));
  EXPECT_EQ(info.custom_id, "c1");
  EXPECT_EQ(info.endpoint, Endpoint::kCompletions);
}

TEST(ValidateLine, AcceptsCompletionPromptArrayOfOneString) {
  json line = CompletionLine();
  line["body"]["prompt"] = json::array({"hello"});
  ExpectValid(line);
}

TEST(ValidateLine, RejectsBadJsonWithLineNumber) {
  LineError e = ExpectError("{\"custom_id\": \"a\", ", 42);
  EXPECT_EQ(e.code, kInvalidJson);
  EXPECT_EQ(e.line, 42);
}

TEST(ValidateLine, RejectsInvalidUtf8AsBadJsonWithValidUtf8Message) {
  LineError e = ExpectError("{\"custom_id\": \"a\xff\xfe\"}");
  EXPECT_EQ(e.code, kInvalidJson);
  EXPECT_NO_THROW(json(e.message).dump());
}

TEST(ValidateLine, RejectsLineThatIsNotAnObject) {
  EXPECT_EQ(ExpectError("[1,2,3]").code, kInvalidJson);
  EXPECT_EQ(ExpectError("\"just a string\"").code, kInvalidJson);
}

TEST(ValidateLine, RejectsMissingCustomId) {
  json line = ChatLine();
  line.erase("custom_id");
  LineError e = ExpectError(line.dump());
  EXPECT_EQ(e.code, kMissingCustomId);
  EXPECT_EQ(e.param, "custom_id");
}

TEST(ValidateLine, RejectsEmptyCustomId) {
  json line = ChatLine("");
  EXPECT_EQ(ExpectError(line.dump()).code, kMissingCustomId);
}

TEST(ValidateLine, RejectsNonStringCustomId) {
  json line = ChatLine();
  line["custom_id"] = 12;
  EXPECT_EQ(ExpectError(line.dump()).code, kMissingCustomId);
}

TEST(ValidateLine, RejectsWrongMethodAndKeepsCustomId) {
  json line = ChatLine("x1");
  line["method"] = "GET";
  LineError e = ExpectError(line.dump());
  EXPECT_EQ(e.code, kInvalidMethod);
  EXPECT_EQ(e.custom_id, "x1");
  line.erase("method");
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMethod);
}

TEST(ValidateLine, RejectsUnknownUrl) {
  json line = ChatLine();
  line["url"] = "/v1/moderations";
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidUrl);
  line["url"] = "/v1/embeddings";  // a supported url: a chat body is no embeddings input
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidInput);
  line["url"] = 3;
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidUrl);
  line.erase("url");
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidUrl);
}

TEST(ValidateLine, RejectsBodyMissingOrNotObject) {
  json line = ChatLine();
  line["body"] = "text";
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidBody);
  line.erase("body");
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidBody);
}

TEST(ValidateLine, RejectsMissingOrEmptyMessages) {
  json line = ChatLine();
  line["body"].erase("messages");
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
  line["body"]["messages"] = json::array();
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
  line["body"]["messages"] = "hello";
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
}

TEST(ValidateLine, RejectsMalformedMessageElementNamingIt) {
  json line = ChatLine();
  line["body"]["messages"][1] = "not an object";
  LineError e = ExpectError(line.dump());
  EXPECT_EQ(e.code, kInvalidMessages);
  EXPECT_EQ(e.param, "body.messages[1]");

  line = ChatLine();
  line["body"]["messages"][1].erase("role");
  e = ExpectError(line.dump());
  EXPECT_EQ(e.code, kInvalidMessages);
  EXPECT_EQ(e.param, "body.messages[1].role");

  line = ChatLine();
  line["body"]["messages"][0]["content"] = 5;
  e = ExpectError(line.dump());
  EXPECT_EQ(e.code, kInvalidMessages);
  EXPECT_EQ(e.param, "body.messages[0].content");

  line = ChatLine();
  line["body"]["messages"][1].erase("content");
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
}

TEST(ValidateLine, AcceptsTextContentPartsAndRejectsOtherParts) {
  json line = ChatLine();
  line["body"]["messages"][1]["content"] =
      json::array({json{{"type", "text"}, {"text", "a"}}, json{{"type", "text"}, {"text", "b"}}});
  ExpectValid(line);

  line["body"]["messages"][1]["content"] = json::array({json{{"type", "image_url"}, {"image_url", "x"}}});
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
  line["body"]["messages"][1]["content"] = json::array({json{{"type", "text"}}});
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
  line["body"]["messages"][1]["content"] = json::array({"plain"});
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidMessages);
}

TEST(ValidateLine, AcceptsAssistantMessageWithNullContent) {
  json line = ChatLine();
  line["body"]["messages"].insert(line["body"]["messages"].begin() + 1,
                                  json{{"role", "assistant"}, {"content", nullptr}});
  ExpectValid(line);
}

TEST(ValidateLine, RejectsMissingOrNonStringPrompt) {
  json line = CompletionLine();
  line["body"].erase("prompt");
  LineError e = ExpectError(line.dump());
  EXPECT_EQ(e.code, kInvalidPrompt);
  EXPECT_EQ(e.param, "body.prompt");
  line["body"]["prompt"] = 17;
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidPrompt);
  line["body"]["prompt"] = json::array({"a", "b"});
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidPrompt);
  line["body"]["prompt"] = json::array({1, 2, 3});
  EXPECT_EQ(ExpectError(line.dump()).code, kInvalidPrompt);
}

TEST(ValidateLine, SurvivesDeeplyNestedJson) {
  std::string deep = "{\"custom_id\":\"a\",\"x\":" + std::string(200000, '[') + std::string(200000, ']') + "}";
  auto r = ValidateLine(deep, 1);
  ASSERT_TRUE(std::holds_alternative<LineError>(r));  // too deep, found without recursing
  EXPECT_EQ(std::get<LineError>(r).code, kJsonTooDeep);
  EXPECT_EQ(std::get<LineError>(r).custom_id, "a");
}

// ---- prefix_hash ---------------------------------------------------------------

TEST(ValidateLine, PrefixHashEqualWhenOnlyLastMessageDiffers) {
  json a = ChatLine("a");
  json b = ChatLine("b");
  b["body"]["messages"][1]["content"] = "Bob, a very different candidate";
  b["body"]["temperature"] = 0.2;
  EXPECT_EQ(ExpectValid(a).prefix_hash, ExpectValid(b).prefix_hash);
}

TEST(ValidateLine, PrefixHashDiffersWhenEarlierMessagesDiffer) {
  json a = ChatLine("a");
  json b = ChatLine("b");
  b["body"]["messages"][0]["content"] = "You grade essays.";
  EXPECT_NE(ExpectValid(a).prefix_hash, ExpectValid(b).prefix_hash);

  json c = ChatLine("c");
  c["body"]["messages"][0]["role"] = "developer";
  EXPECT_NE(ExpectValid(a).prefix_hash, ExpectValid(c).prefix_hash);
}

TEST(ValidateLine, PrefixHashIsLengthFramed) {
  json a = ChatLine("a");
  a["body"]["messages"] =
      json::array({json{{"role", "user"}, {"content", "ab"}}, json{{"role", "user"}, {"content", "c"}},
                   json{{"role", "user"}, {"content", "last"}}});
  json b = a;
  b["body"]["messages"][0]["content"] = "a";
  b["body"]["messages"][1]["content"] = "bc";
  EXPECT_NE(ExpectValid(a).prefix_hash, ExpectValid(b).prefix_hash);
}

TEST(ValidateLine, PrefixHashOfCompletionsUsesPromptStart) {
  std::string common(300, 'x');
  json a = CompletionLine("a");
  json b = CompletionLine("b");
  a["body"]["prompt"] = common + "tail one";
  b["body"]["prompt"] = common + "tail two";
  EXPECT_EQ(ExpectValid(a).prefix_hash, ExpectValid(b).prefix_hash);
  b["body"]["prompt"] = "y" + common;
  EXPECT_NE(ExpectValid(a).prefix_hash, ExpectValid(b).prefix_hash);
}

TEST(ValidateLine, PrefixHashDiffersBetweenEndpoints) {
  json chat = ChatLine("a");
  chat["body"]["messages"] = json::array({json{{"role", "user"}, {"content", "x"}}});
  json comp = CompletionLine("b");
  comp["body"]["prompt"] = "";
  EXPECT_NE(ExpectValid(chat).prefix_hash, ExpectValid(comp).prefix_hash);
}

// ---- ParseRequest --------------------------------------------------------------

ParsedRequest ExpectParsed(const json& line) {
  auto r = ParseRequest(line.dump());
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r.value() : ParsedRequest{};
}

void ExpectInvalidParam(const json& line, const std::string& param) {
  std::string got_param;
  auto r = ParseRequest(line.dump(), &got_param);
  ASSERT_FALSE(r.ok()) << line.dump();
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(got_param, param);
  EXPECT_NE(r.status().message().find("'" + param + "'"), std::string::npos) << r.status().message();
}

json WithParam(const std::string& name, const json& value) {
  json line = ChatLine();
  line["body"][name] = value;
  return line;
}

TEST(ParseRequest, ParsesChatMessagesAndModel) {
  ParsedRequest r = ExpectParsed(ChatLine("id-9"));
  EXPECT_EQ(r.custom_id, "id-9");
  EXPECT_EQ(r.endpoint, Endpoint::kChatCompletions);
  EXPECT_EQ(r.model, "m");
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[0].role, "system");
  EXPECT_EQ(r.messages[0].content, "You grade CVs.");
  EXPECT_EQ(r.messages[1].role, "user");
  EXPECT_EQ(r.messages[1].content, "Alice");
}

TEST(ParseRequest, JoinsTextPartsWithNewline) {
  json line = ChatLine();
  line["body"]["messages"][1]["content"] =
      json::array({json{{"type", "text"}, {"text", "a"}}, json{{"type", "text"}, {"text", "b"}}});
  EXPECT_EQ(ExpectParsed(line).messages[1].content, "a\nb");
}

TEST(ParseRequest, ParsesCompletionPrompt) {
  ParsedRequest r = ExpectParsed(CompletionLine());
  EXPECT_EQ(r.endpoint, Endpoint::kCompletions);
  EXPECT_EQ(r.prompt, "Once upon a time");
  json line = CompletionLine();
  line["body"]["prompt"] = json::array({"only one"});
  EXPECT_EQ(ExpectParsed(line).prompt, "only one");
}

TEST(ParseRequest, DefaultsFollowOpenAI) {
  json line = ChatLine();
  line["body"].erase("model");
  ParsedRequest r = ExpectParsed(line);
  engine::SamplingParams d;
  EXPECT_EQ(r.model, "");
  EXPECT_EQ(r.sampling.temperature, d.temperature);
  EXPECT_EQ(r.sampling.top_p, d.top_p);
  EXPECT_EQ(r.sampling.top_k, 0);
  EXPECT_EQ(r.sampling.min_p, 0.0f);
  EXPECT_EQ(r.sampling.presence_penalty, 0.0f);
  EXPECT_EQ(r.sampling.frequency_penalty, 0.0f);
  EXPECT_EQ(r.sampling.max_tokens, -1);
  EXPECT_TRUE(r.sampling.stop.empty());
  EXPECT_TRUE(r.sampling.logit_bias.empty());
  EXPECT_FALSE(r.has_seed);
}

TEST(ParseRequest, NullParametersMeanDefault) {
  json line = WithParam("temperature", nullptr);
  line["body"]["max_tokens"] = nullptr;
  line["body"]["stop"] = nullptr;
  line["body"]["seed"] = nullptr;
  ParsedRequest r = ExpectParsed(line);
  EXPECT_EQ(r.sampling.temperature, 1.0f);
  EXPECT_EQ(r.sampling.max_tokens, -1);
  EXPECT_FALSE(r.has_seed);
}

TEST(ParseRequest, ReadsSamplingParameters) {
  json line = ChatLine();
  line["body"].update(json{{"temperature", 0},
                           {"top_p", 0.9},
                           {"top_k", 40},
                           {"min_p", 0.05},
                           {"presence_penalty", -1.5},
                           {"frequency_penalty", 2},
                           {"n", 1},
                           {"max_tokens", 16},
                           {"logit_bias", json{{"50256", -100}, {"7", 2.5}}},
                           {"seed", 1234},
                           {"stream", false},
                           {"some_future_field", json{{"x", 1}}}});
  ParsedRequest r = ExpectParsed(line);
  EXPECT_EQ(r.sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_EQ(r.sampling.top_k, 40);
  EXPECT_FLOAT_EQ(r.sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(r.sampling.presence_penalty, -1.5f);
  EXPECT_FLOAT_EQ(r.sampling.frequency_penalty, 2.0f);
  EXPECT_EQ(r.sampling.max_tokens, 16);
  ASSERT_EQ(r.sampling.logit_bias.size(), 2u);
  EXPECT_EQ(r.sampling.logit_bias[0], (std::pair<engine::Token, float>{7, 2.5f}));
  EXPECT_EQ(r.sampling.logit_bias[1], (std::pair<engine::Token, float>{50256, -100.0f}));
  EXPECT_TRUE(r.has_seed);
  EXPECT_EQ(r.sampling.seed, 1234u);
}

TEST(ParseRequest, TemperatureOutOfRangeNamesParam) {
  ExpectInvalidParam(WithParam("temperature", 2.5), "temperature");
  ExpectInvalidParam(WithParam("temperature", -0.1), "temperature");
  ExpectInvalidParam(WithParam("temperature", "hot"), "temperature");
  ExpectParsed(WithParam("temperature", 2));
}

TEST(ParseRequest, TopPMustBeInHalfOpenUnitInterval) {
  ExpectInvalidParam(WithParam("top_p", 0), "top_p");
  ExpectInvalidParam(WithParam("top_p", 1.01), "top_p");
  ExpectParsed(WithParam("top_p", 1));
}

TEST(ParseRequest, TopKMustNotBeNegativeExceptVllmOff) {
  ExpectInvalidParam(WithParam("top_k", -2), "top_k");
  ExpectInvalidParam(WithParam("top_k", 1.5), "top_k");
  EXPECT_EQ(ExpectParsed(WithParam("top_k", -1)).sampling.top_k, 0);
}

TEST(ParseRequest, MinPMustBeInUnitInterval) {
  ExpectInvalidParam(WithParam("min_p", -0.01), "min_p");
  ExpectInvalidParam(WithParam("min_p", 1.5), "min_p");
}

TEST(ParseRequest, PenaltiesMustBeWithinTwo) {
  ExpectInvalidParam(WithParam("presence_penalty", 2.1), "presence_penalty");
  ExpectInvalidParam(WithParam("frequency_penalty", -2.1), "frequency_penalty");
  ExpectInvalidParam(WithParam("frequency_penalty", true), "frequency_penalty");
}

TEST(ParseRequest, NChoicesIsBounded) {
  EXPECT_EQ(ExpectParsed(ChatLine()).n, 1);
  EXPECT_EQ(ExpectParsed(WithParam("n", 3)).n, 3);
  EXPECT_EQ(ExpectParsed(WithParam("n", kMaxChoices)).n, kMaxChoices);
  ExpectInvalidParam(WithParam("n", 0), "n");
  ExpectInvalidParam(WithParam("n", kMaxChoices + 1), "n");
  ExpectInvalidParam(WithParam("n", "1"), "n");
}

TEST(ParseRequest, ChatLogprobsIsABooleanAndTopLogprobsNeedsIt) {
  ParsedRequest off = ExpectParsed(ChatLine());
  EXPECT_FALSE(off.logprobs);
  EXPECT_EQ(off.top_logprobs, 0);
  json line = WithParam("logprobs", true);
  line["body"]["top_logprobs"] = 20;
  ParsedRequest on = ExpectParsed(line);
  EXPECT_TRUE(on.logprobs);
  EXPECT_EQ(on.top_logprobs, 20);
  line["body"]["top_logprobs"] = 21;
  ExpectInvalidParam(line, "top_logprobs");
  ExpectInvalidParam(WithParam("top_logprobs", 2), "top_logprobs");  // logprobs absent
  EXPECT_FALSE(ExpectParsed(WithParam("top_logprobs", 0)).logprobs);
  ExpectInvalidParam(WithParam("logprobs", 1), "logprobs");
}

TEST(ParseRequest, CompletionsLogprobsIsTheNumberOfAlternatives) {
  json line = CompletionLine();
  line["body"]["logprobs"] = 5;
  ParsedRequest r = ExpectParsed(line);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 5);
  line["body"]["logprobs"] = 0;
  EXPECT_TRUE(ExpectParsed(line).logprobs);
  line["body"]["logprobs"] = 21;
  ExpectInvalidParam(line, "logprobs");
  line["body"]["logprobs"] = true;
  ExpectInvalidParam(line, "logprobs");
}

TEST(ParseRequest, ResponseFormatJsonSchemaKeepsPropertyOrder) {
  // Written in non-alphabetical order: the grammar generates properties in
  // the schema's order, so it must survive parsing.
  const std::string line =
      R"({"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],)"
      R"("response_format":{"type":"json_schema","json_schema":{"name":"s","strict":true,"schema":)"
      R"({"type":"object","properties":{"zeta":{"type":"integer"},"alpha":{"type":"string"}}}}}}})";
  auto r = ParseRequest(line);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->response_format, ResponseFormat::kJsonSchema);
  EXPECT_EQ(r->json_schema, R"({"type":"object","properties":{"zeta":{"type":"integer"},"alpha":{"type":"string"}}})");
}

TEST(ParseRequest, ResponseFormatTypes) {
  EXPECT_EQ(ExpectParsed(ChatLine()).response_format, ResponseFormat::kText);
  EXPECT_EQ(ExpectParsed(WithParam("response_format", json{{"type", "text"}})).response_format, ResponseFormat::kText);
  EXPECT_EQ(ExpectParsed(WithParam("response_format", json{{"type", "json_object"}})).response_format,
            ResponseFormat::kJsonObject);
  ParsedRequest with_schema =
      ExpectParsed(WithParam("response_format", json{{"type", "json_object"}, {"schema", json{{"type", "object"}}}}));
  EXPECT_EQ(with_schema.response_format, ResponseFormat::kJsonSchema);
  EXPECT_EQ(with_schema.json_schema, R"({"type":"object"})");
  ExpectInvalidParam(WithParam("response_format", "json"), "response_format");
  ExpectInvalidParam(WithParam("response_format", json{{"type", "yaml"}}), "response_format");
  ExpectInvalidParam(WithParam("response_format", json{{"type", "json_schema"}}), "response_format.json_schema");
  ExpectInvalidParam(WithParam("response_format", json{{"type", "json_schema"}, {"json_schema", json{{"schema", 5}}}}),
                     "response_format.json_schema.schema");
  ExpectInvalidParam(
      WithParam("response_format", json{{"type", "json_schema"}, {"json_schema", json{{"name", 1}, {"schema", json::object()}}}}),
      "response_format.json_schema.name");
}

TEST(ParseRequest, MaxTokensMustBePositiveInteger) {
  ExpectInvalidParam(WithParam("max_tokens", 0), "max_tokens");
  ExpectInvalidParam(WithParam("max_tokens", 2.5), "max_tokens");
  ExpectInvalidParam(WithParam("max_tokens", "10"), "max_tokens");
  ExpectInvalidParam(WithParam("max_tokens", 1e12), "max_tokens");
  ExpectInvalidParam(WithParam("max_completion_tokens", -3), "max_completion_tokens");
  EXPECT_EQ(ExpectParsed(WithParam("max_tokens", 8.0)).sampling.max_tokens, 8);
}

TEST(ParseRequest, MaxCompletionTokensWinsOverMaxTokens) {
  json line = WithParam("max_tokens", 100);
  line["body"]["max_completion_tokens"] = 7;
  EXPECT_EQ(ExpectParsed(line).sampling.max_tokens, 7);
  EXPECT_EQ(ExpectParsed(WithParam("max_completion_tokens", 9)).sampling.max_tokens, 9);
}

TEST(ParseRequest, StopAcceptsStringOrUpToFourStrings) {
  EXPECT_EQ(ExpectParsed(WithParam("stop", "\n\n")).sampling.stop, std::vector<std::string>{"\n\n"});
  EXPECT_EQ(ExpectParsed(WithParam("stop", json::array({"a", "b", "c", "d"}))).sampling.stop,
            (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_EQ(ExpectParsed(WithParam("stop", json::array({"a", ""}))).sampling.stop, std::vector<std::string>{"a"});
  ExpectInvalidParam(WithParam("stop", json::array({"a", "b", "c", "d", "e"})), "stop");
  ExpectInvalidParam(WithParam("stop", json::array({"a", 1})), "stop");
  ExpectInvalidParam(WithParam("stop", 5), "stop");
}

TEST(ParseRequest, LogitBiasNeedsTokenIdKeysAndBoundedValues) {
  ExpectInvalidParam(WithParam("logit_bias", json{{"abc", 1}}), "logit_bias");
  ExpectInvalidParam(WithParam("logit_bias", json{{"-5", 1}}), "logit_bias");
  ExpectInvalidParam(WithParam("logit_bias", json{{"99999999999", 1}}), "logit_bias");
  ExpectInvalidParam(WithParam("logit_bias", json{{"5", 101}}), "logit_bias");
  ExpectInvalidParam(WithParam("logit_bias", json{{"5", "1"}}), "logit_bias");
  ExpectInvalidParam(WithParam("logit_bias", json::array({1})), "logit_bias");
}

TEST(ParseRequest, SeedMustBeInteger) {
  ExpectInvalidParam(WithParam("seed", 1.5), "seed");
  ExpectInvalidParam(WithParam("seed", "42"), "seed");
  ParsedRequest r = ExpectParsed(WithParam("seed", -1));
  EXPECT_TRUE(r.has_seed);
  EXPECT_EQ(r.sampling.seed, ~uint64_t{0});
  EXPECT_EQ(ExpectParsed(WithParam("seed", 18446744073709551615ull)).sampling.seed, ~uint64_t{0});
}

TEST(ParseRequest, ModelMustBeString) { ExpectInvalidParam(WithParam("model", 3), "model"); }

TEST(ParseRequest, SeedFromCustomIdIsStableAndDistinct) {
  ParsedRequest a = ExpectParsed(ChatLine("alpha"));
  ParsedRequest a2 = ExpectParsed(ChatLine("alpha"));
  ParsedRequest b = ExpectParsed(ChatLine("beta"));
  EXPECT_FALSE(a.has_seed);
  EXPECT_EQ(a.sampling.seed, a2.sampling.seed);
  EXPECT_NE(a.sampling.seed, b.sampling.seed);
  EXPECT_EQ(a.sampling.seed, SeedFromCustomId("alpha"));
  // Pinned: FNV-1a 64 reference values, so the default seed never drifts between builds.
  EXPECT_EQ(Fnv1a64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(Fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(Fnv1a64("foobar"), 0x85944171f73967e8ull);
}

TEST(ParseRequest, StructuralErrorIsInvalidArgument) {
  std::string param;
  auto r =
      ParseRequest("{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{}}", &param);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(param, "body.messages");
}

}  // namespace
}  // namespace kvb::batch
