// Hostile input at the parsing edge (DESIGN.md section 5): nesting, sizes,
// counts and unsupported fields give a clear error naming the limit or the
// field, never a crash.
#include "batch/limits.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "batch/request.h"

namespace kvb::batch {
namespace {

using nlohmann::json;

std::string Nested(size_t depth, char open = '[', char close = ']') {
  return std::string(depth, open) + std::string(depth, close);
}

json Chat(json body_extra = json::object()) {
  json body = {{"messages", json::array({json{{"role", "user"}, {"content", "hi"}}})}};
  for (auto& [k, v] : body_extra.items()) body[k] = v;
  return json{{"custom_id", "c"}, {"method", "POST"}, {"url", "/v1/chat/completions"}, {"body", body}};
}

// The body's parameter error (ParseRequest), or "" when it parses.
std::string ParamError(const json& line, std::string* message = nullptr) {
  std::string param;
  auto r = ParseRequest(line.dump(), &param);
  if (r.ok()) return "";
  if (message) *message = r.status().message();
  return param.empty() ? "<no param>" : param;
}

TEST(CheckJsonDepth, CountsOnlyBracketsOutsideStrings) {
  EXPECT_TRUE(CheckJsonDepth(Nested(64), 64).ok());
  EXPECT_FALSE(CheckJsonDepth(Nested(65), 64).ok());
  EXPECT_FALSE(CheckJsonDepth(Nested(65, '{', '}'), 64).ok());
  // Brackets inside strings, escaped quotes included, do not nest.
  EXPECT_TRUE(CheckJsonDepth(R"({"a":"[[[[[[[[[[\"[[[[[[[["})", 2).ok());
  EXPECT_FALSE(CheckJsonDepth(R"({"a":"\\",[[]]})", 2).ok());
  // Unbalanced input is the parser's business, not a crash here.
  EXPECT_TRUE(CheckJsonDepth("]]]]}}}", 1).ok());
}

TEST(HostileLine, HundredThousandLevelsIsTooDeepNotACrash) {
  std::string deep = R"({"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"metadata":)" +
                     Nested(100000) + "}}";
  auto r = ValidateLine(deep, 9);
  ASSERT_TRUE(std::holds_alternative<LineError>(r));
  const LineError& e = std::get<LineError>(r);
  EXPECT_EQ(e.code, kJsonTooDeep);
  EXPECT_EQ(e.line, 9);
  EXPECT_NE(e.message.find("nest"), std::string::npos) << e.message;
  EXPECT_FALSE(ParseRequest(deep).ok());
}

TEST(HostileLine, DeepSchemaIsRejectedBeforeTheGrammarConverter) {
  std::string schema;
  for (int i = 0; i < 20000; ++i) schema += R"({"type":"array","items":)";
  schema += R"({"type":"string"})";
  for (int i = 0; i < 20000; ++i) schema += "}";
  const std::string line = R"({"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{)"
                           R"("messages":[{"role":"user","content":"a"}],"response_format":{"type":"json_schema",)"
                           R"("json_schema":{"name":"n","schema":)" +
                           schema + "}}}}";
  auto r = ValidateLine(line, 3);
  ASSERT_TRUE(std::holds_alternative<LineError>(r));
  EXPECT_EQ(std::get<LineError>(r).code, kJsonTooDeep);
}

TEST(HostileLine, UnknownRoleIsRejectedNamingTheField) {
  json line = Chat();
  line["body"]["messages"][0]["role"] = "wizard";
  auto r = ValidateLine(line.dump(), 1);
  ASSERT_TRUE(std::holds_alternative<LineError>(r));
  EXPECT_EQ(std::get<LineError>(r).param, "body.messages[0].role");
  EXPECT_EQ(std::get<LineError>(r).code, kInvalidMessages);
}

TEST(HostileLine, ToolCallsAndToolResultsInTheHistoryAreCheckedField_by_field) {
  auto error = [](const json& line) {
    auto r = ValidateLine(line.dump(), 1);
    return std::holds_alternative<LineError>(r) ? std::get<LineError>(r) : LineError{};
  };
  json ok = Chat();
  ok["body"]["messages"].push_back(
      {{"role", "assistant"},
       {"content", nullptr},
       {"tool_calls", {{{"id", "t"}, {"type", "function"}, {"function", {{"name", "f"}, {"arguments", "{}"}}}}}}});
  ok["body"]["messages"].push_back({{"role", "tool"}, {"content", "42"}, {"tool_call_id", "t"}});
  EXPECT_EQ(error(ok).code, "");

  json no_id = Chat();
  no_id["body"]["messages"].push_back({{"role", "tool"}, {"content", "42"}});
  EXPECT_EQ(error(no_id).code, kInvalidMessages);
  EXPECT_EQ(error(no_id).param, "body.messages[1].tool_call_id");

  json no_fn = Chat();
  no_fn["body"]["messages"].push_back(
      {{"role", "assistant"}, {"content", nullptr}, {"tool_calls", json::array({{{"id", "t"}}})}});
  EXPECT_EQ(error(no_fn).param, "body.messages[1].tool_calls[0]");
  EXPECT_NE(error(no_fn).message.find(".function"), std::string::npos);

  json bad_args = ok;
  bad_args["body"]["messages"][1]["tool_calls"][0]["function"]["arguments"] = 5;
  EXPECT_EQ(error(bad_args).param, "body.messages[1].tool_calls[0]");

  json user_calls = ok;
  user_calls["body"]["messages"][1]["role"] = "user";
  EXPECT_EQ(error(user_calls).param, "body.messages[1].tool_calls");

  // The deprecated forms are refused, not rendered as text.
  json function_role = Chat();
  function_role["body"]["messages"].push_back({{"role", "function"}, {"content", "42"}, {"name", "f"}});
  EXPECT_EQ(error(function_role).code, kUnsupported);
  EXPECT_EQ(error(function_role).param, "body.messages[1].role");
  json function_call = Chat();
  function_call["body"]["messages"].push_back(
      {{"role", "assistant"}, {"content", nullptr}, {"function_call", {{"name", "f"}, {"arguments", "{}"}}}});
  EXPECT_EQ(error(function_call).code, kUnsupported);
  EXPECT_EQ(error(function_call).param, "body.messages[1].function_call");
}

TEST(HostileParams, ToolsToolChoiceAndParallelToolCallsAreCheckedField_by_field) {
  const json route = {{"type", "function"},
                      {"function", {{"name", "route"}, {"parameters", {{"type", "object"}}}}}};
  EXPECT_EQ(ParamError(Chat({{"tools", {route}}, {"tool_choice", "required"}, {"parallel_tool_calls", false}})), "");
  EXPECT_EQ(ParamError(Chat({{"tools", {route}},
                             {"tool_choice", {{"type", "function"}, {"function", {{"name", "route"}}}}}})),
            "");
  EXPECT_EQ(ParamError(Chat({{"tools", json::array()}})), "tools");
  EXPECT_EQ(ParamError(Chat({{"tools", "route"}})), "tools");
  EXPECT_EQ(ParamError(Chat({{"tools", {{{"type", "function"}}}}})), "tools[0].function");
  EXPECT_EQ(ParamError(Chat({{"tools", {{{"type", "retrieval"}}}}})), "tools[0].type");
  json bad_name = route;
  bad_name["function"]["name"] = "route me";
  EXPECT_EQ(ParamError(Chat({{"tools", {bad_name}}})), "tools[0].function.name");
  EXPECT_EQ(ParamError(Chat({{"tools", {route, route}}})), "tools[1].function.name");
  json bad_params = route;
  bad_params["function"]["parameters"] = "object";
  EXPECT_EQ(ParamError(Chat({{"tools", {bad_params}}})), "tools[0].function.parameters");
  EXPECT_EQ(ParamError(Chat({{"tools", {route}}, {"tool_choice", "sometimes"}})), "tool_choice");
  EXPECT_EQ(ParamError(Chat({{"tools", {route}},
                             {"tool_choice", {{"type", "function"}, {"function", {{"name", "other"}}}}}})),
            "tool_choice");
  EXPECT_EQ(ParamError(Chat({{"tool_choice", "required"}})), "tool_choice");
  EXPECT_EQ(ParamError(Chat({{"tool_choice", "none"}})), "");
  EXPECT_EQ(ParamError(Chat({{"tools", {route}}, {"parallel_tool_calls", "yes"}})), "parallel_tool_calls");
  json completion = {{"custom_id", "c"}, {"method", "POST"}, {"url", "/v1/completions"},
                     {"body", {{"prompt", "p"}, {"tools", {route}}}}};
  EXPECT_EQ(ParamError(completion), "tools");
}

TEST(HostileLine, DeveloperRoleAndEmptyToolCallsAreFine) {
  json line = Chat();
  line["body"]["messages"].insert(line["body"]["messages"].begin(), json{{"role", "developer"}, {"content", "Be brief."}});
  line["body"]["messages"].push_back({{"role", "assistant"}, {"content", "ok"}, {"tool_calls", json::array()}});
  line["body"]["messages"].push_back({{"role", "user"}, {"content", "again"}});
  EXPECT_TRUE(std::holds_alternative<LineInfo>(ValidateLine(line.dump(), 1)));
}

TEST(HostileLine, TooManyMessagesOrTooMuchTextNamesTheLimit) {
  json many = Chat();
  for (int i = 0; i < GetLimits().max_messages; ++i) many["body"]["messages"].push_back({{"role", "user"}, {"content", "x"}});
  auto r = ValidateLine(many.dump(), 1);
  ASSERT_TRUE(std::holds_alternative<LineError>(r));
  EXPECT_NE(std::get<LineError>(r).message.find("limit"), std::string::npos);

  Limits small = GetLimits();
  small.max_prompt_bytes = 100;
  SetLimits(small);
  json big = Chat();
  big["body"]["messages"][0]["content"] = std::string(101, 'a');
  r = ValidateLine(big.dump(), 1);
  SetLimits(Limits{});
  ASSERT_TRUE(std::holds_alternative<LineError>(r));
  EXPECT_NE(std::get<LineError>(r).message.find("prompt size limit"), std::string::npos);
}

TEST(HostileParams, UnsupportedFieldsAreA400NamingThem) {
  for (const char* field : {"functions", "function_call", "audio", "prediction"}) {
    EXPECT_EQ(ParamError(Chat({{field, json::array({{{"type", "function"}}})}})), field);
  }
  EXPECT_EQ(ParamError(Chat({{"modalities", {"text", "audio"}}})), "modalities");
  EXPECT_EQ(ParamError(Chat({{"modalities", {"text"}}})), "");
  // Fields that do not change the answer are ignored.
  EXPECT_EQ(ParamError(Chat({{"user", "u"}, {"store", false}, {"service_tier", "auto"}, {"parallel_tool_calls", true}})), "");

  json completion = {{"custom_id", "c"}, {"method", "POST"}, {"url", "/v1/completions"},
                     {"body", {{"prompt", "p"}, {"echo", true}}}};
  EXPECT_EQ(ParamError(completion), "echo");
  completion["body"] = {{"prompt", "p"}, {"best_of", 3}};
  EXPECT_EQ(ParamError(completion), "best_of");
  completion["body"] = {{"prompt", "p"}, {"best_of", 1}, {"echo", false}, {"suffix", ""}};
  EXPECT_EQ(ParamError(completion), "");
}

TEST(HostileParams, CountsAndSizesAreBounded) {
  json bias = json::object();
  for (int i = 0; i <= GetLimits().max_logit_bias; ++i) bias[std::to_string(i)] = 1;
  EXPECT_EQ(ParamError(Chat({{"logit_bias", bias}})), "logit_bias");
  EXPECT_EQ(ParamError(Chat({{"stop", {"a", "b", "c", "d", "e"}}})), "stop");
  EXPECT_EQ(ParamError(Chat({{"stop", std::string(GetLimits().max_stop_bytes + 1, 's')}})), "stop");
  EXPECT_EQ(ParamError(Chat({{"n", kMaxChoices + 1}})), "n");
  json meta = json::object();
  for (int i = 0; i <= GetLimits().max_metadata_keys; ++i) meta["k" + std::to_string(i)] = "v";
  EXPECT_EQ(ParamError(Chat({{"metadata", meta}})), "metadata");
  EXPECT_EQ(ParamError(Chat({{"metadata", {{"k", {{"nested", 1}}}}}})), "metadata.k");
  EXPECT_EQ(ParamError(Chat({{"metadata", {{"k", "v"}}}})), "");
}

json WithSchema(const json& schema) {
  return Chat({{"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "s"}, {"schema", schema}}}}}});
}

TEST(HostileParams, SchemasThatUnrollHugeGrammarsAreRejected) {
  std::string msg;
  EXPECT_EQ(ParamError(WithSchema({{"type", "array"}, {"items", {{"type", "string"}}}, {"minItems", 1000000}}), &msg),
            "response_format.json_schema.schema");
  EXPECT_NE(msg.find("minItems"), std::string::npos) << msg;
  EXPECT_NE(ParamError(WithSchema({{"type", "string"}, {"maxLength", 1e12}})), "");
  EXPECT_NE(ParamError(WithSchema({{"type", "string"}, {"pattern", "^a{2000000}$"}})), "");
  EXPECT_NE(ParamError(WithSchema({{"type", "string"}, {"pattern", "^a{1,99999999999999999999}$"}})), "");
  // Nested deep inside: still found.
  EXPECT_NE(ParamError(WithSchema({{"type", "object"},
                                   {"properties", {{"a", {{"type", "array"}, {"items", {{"maxItems", 5000}}}}}}}})),
            "");
  json big_enum = json::array();
  for (int i = 0; i <= GetLimits().max_schema_enum; ++i) big_enum.push_back(i);
  EXPECT_NE(ParamError(WithSchema({{"enum", big_enum}})), "");
  // Ordinary schemas pass.
  EXPECT_EQ(ParamError(WithSchema({{"type", "object"},
                                   {"properties", {{"tags", {{"type", "array"}, {"maxItems", 10}}},
                                                   {"code", {{"type", "string"}, {"pattern", "^[A-Z]{3}$"}}}}}})),
            "");
}

}  // namespace
}  // namespace kvb::batch
