// Tool calling on generated models carrying real chat templates from
// llama.cpp's models/templates: the tools and a tool conversation render,
// requests sharing system + tools share a token prefix, each template's
// own tool-call format is read back into calls, and through `kvbatch run`
// a forced call comes back as message.tool_calls with arguments valid
// against the function's schema and finish_reason "tool_calls".
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "engine/chat_tools.h"
#include "engine/model.h"
#include "fixtures.h"
#include "llama.h"

namespace kvb::testing {
namespace {

using engine::ChatMessage;
using engine::ChatOptions;
using engine::ChatTool;
using engine::Model;
using nlohmann::json;

#ifdef KVBATCH_HAVE_LLAMA_COMMON

const char* kRouteSchema = R"({"type":"object","properties":{"team":{"type":"string","enum":["billing","tech","sales"]},"urgent":{"type":"boolean"}},"required":["team","urgent"],"additionalProperties":false})";
const char* kLookupSchema = R"({"type":"object","properties":{"order":{"type":"integer","minimum":1,"maximum":999}},"required":["order"],"additionalProperties":false})";

std::vector<ChatTool> Tools() {
  return {{"route", "Route a support ticket to a team", kRouteSchema},
          {"lookup_order", "Look an order up by number", kLookupSchema}};
}

json ToolsJson() {
  json tools = json::array();
  for (const auto& t : Tools())
    tools.push_back({{"type", "function"},
                     {"function", {{"name", t.name}, {"description", t.description}, {"parameters", json::parse(t.parameters)}}}});
  return tools;
}

// Empty when `args` is JSON valid against kRouteSchema, else why not.
std::string ValidateRoute(const std::string& args) {
  json v = json::parse(args, nullptr, false);
  if (!v.is_object()) return "not a JSON object: " + args;
  if (v.size() != 2 || !v.contains("team") || !v.contains("urgent")) return "needs exactly team and urgent: " + args;
  const json& team = v["team"];
  if (!team.is_string() || (team != "billing" && team != "tech" && team != "sales")) return "team not in the enum";
  if (!v["urgent"].is_boolean()) return "urgent is not a boolean";
  return "";
}

struct Template {
  const char* file;
  const char* vocab;
  // The answer a model of this family gives to call route(team=tech, urgent=true).
  const char* call_text;
};

const Template kTemplates[] = {
    {"Qwen-Qwen2.5-7B-Instruct", "qwen2",
     "<tool_call>\n{\"name\": \"route\", \"arguments\": {\"team\": \"tech\", \"urgent\": true}}\n</tool_call>"},
    {"NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "llama-bpe",
     "<tool_call>\n{\"name\": \"route\", \"arguments\": {\"team\": \"tech\", \"urgent\": true}}\n</tool_call>"},
    {"meta-llama-Llama-3.1-8B-Instruct", "llama-bpe",
     "{\"name\": \"route\", \"parameters\": {\"team\": \"tech\", \"urgent\": true}}"},
    {"mistralai-Mistral-Nemo-Instruct-2407", "llama-spm",
     "[TOOL_CALLS][{\"name\": \"route\", \"arguments\": {\"team\": \"tech\", \"urgent\": true}, \"id\": \"a1b2c3d4e\"}]"},
};

void PrintTo(const Template& t, std::ostream* os) { *os << t.file; }

// A tiny model with the template. ctest runs each test in a process of its
// own: the models are generated once for all of them (the generator is
// deterministic; each is written under a temporary name and renamed into
// place, so a process sees a whole file or none).
const std::string& ModelWith(const Template& t) {
  static std::map<std::string, std::string> made;
  auto it = made.find(t.file);
  if (it != made.end()) return it->second;
  const fs::path dir = fs::path(KVBATCH_TEST_TMP) / "tools-models";
  fs::create_directories(dir);
  const fs::path path = dir / (std::string(t.file) + "-" + t.vocab + ".gguf");
  if (!fs::exists(path)) {
    std::ifstream in(fs::path(KVBATCH_TEMPLATES_DIR) / (std::string(t.file) + ".jinja"));
    std::stringstream text;
    text << in.rdbuf();
    auto opts = tools::ModelPreset("tiny");
    opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/ggml-vocab-" + t.vocab + ".gguf";
    opts->chat_template = text.str();
    opts->out_path = path.string() + "." + std::to_string(::getpid()) + ".tmp";
    Status st = tools::GenerateModel(*opts);
    if (!st.ok()) throw std::runtime_error(st.ToString());
    fs::rename(opts->out_path, path);
  }
  return made.emplace(t.file, path.string()).first->second;
}

class ToolsTemplate : public ::testing::TestWithParam<Template> {
 protected:
  void SetUp() override {
    if (!fs::is_directory(KVBATCH_TEMPLATES_DIR)) GTEST_SKIP() << "llama.cpp's templates are not installed";
    auto m = Model::Load({ModelWith(GetParam()), 0});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(m).value();
  }
  std::unique_ptr<Model> model_;
};

const std::string kSystem = "You are the support desk. Route every ticket with the tools.";

TEST_P(ToolsTemplate, ToolsRenderAndRequestsSharingThemShareTheirPrefix) {
  ChatOptions o;
  o.tools = Tools();
  auto a = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "My invoice is wrong."}}, o);
  auto b = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "The site is down."}}, o);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok());
  EXPECT_NE(a->text.find("lookup_order"), std::string::npos) << "the tools are not in the prompt:\n" << a->text;
  EXPECT_NE(a->text.find("team"), std::string::npos);
  // tool_choice auto: a grammar, if the template's format has one, waits
  // for a call to start (Llama 3.1's JSON calls are parsed, not constrained).
  if (!a->grammar.empty()) {
    EXPECT_TRUE(a->grammar_lazy) << "tool_choice auto constrains only once a call starts";
  }
  ASSERT_NE(a->parser, nullptr);
  // Everything before the user's message is one shared token prefix.
  const auto ta = model_->Tokenize(a->text), tb = model_->Tokenize(b->text);
  size_t common = 0;
  while (common < ta.size() && common < tb.size() && ta[common] == tb[common]) ++common;
  const size_t user_at = a->text.find("My invoice");
  ASSERT_NE(user_at, std::string::npos);
  EXPECT_GE(common + 3, model_->Tokenize(a->text.substr(0, user_at)).size());
}

TEST_P(ToolsTemplate, AToolConversationRendersItsCallsAndResults) {
  ChatOptions o;
  o.tools = Tools();
  // Mistral's template wants 9 alphanumeric characters as an id.
  ChatMessage call{"assistant", "", {{"abc123xyz", "route", R"({"team":"billing","urgent":false})"}}, ""};
  ChatMessage result{"tool", "ticket 4411 routed to billing", {}, "abc123xyz"};
  auto p = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "My invoice is wrong."}, call, result}, o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_NE(p->text.find("ticket 4411 routed to billing"), std::string::npos) << p->text;
  EXPECT_NE(p->text.find("billing"), std::string::npos);
}

TEST_P(ToolsTemplate, TheTemplatesOwnCallFormatIsReadBack) {
  ChatOptions o;
  o.tools = Tools();
  auto p = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "The site is down."}}, o);
  ASSERT_TRUE(p.ok());
  engine::ParsedReply r = p->parser->Parse(GetParam().call_text, false);
  ASSERT_EQ(r.tool_calls.size(), 1u) << "content: " << r.content;
  EXPECT_EQ(r.tool_calls[0].name, "route");
  EXPECT_EQ(json::parse(r.tool_calls[0].arguments), json::parse(R"({"team":"tech","urgent":true})"));
  EXPECT_EQ(r.content, "");
  // Plain text stays content.
  engine::ParsedReply text = p->parser->Parse("Hello there.", false);
  EXPECT_TRUE(text.tool_calls.empty());
  EXPECT_EQ(text.content, "Hello there.");
}

TEST_P(ToolsTemplate, ToolChoiceNoneShowsTheToolsButNeitherConstrainsNorParses) {
  ChatOptions o;
  o.tools = Tools();
  o.tool_choice = engine::ToolChoice::kNone;
  auto p = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "Hi."}}, o);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->grammar.empty());
  EXPECT_EQ(p->parser, nullptr);
}

TEST_P(ToolsTemplate, RequiredAndNamedChoicesGiveAStrictGrammarForTheirTools) {
  ChatOptions o;
  o.tools = Tools();
  o.tool_choice = engine::ToolChoice::kRequired;
  auto all = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "Hi."}}, o);
  ASSERT_TRUE(all.ok());
  EXPECT_FALSE(all->grammar_lazy);
  EXPECT_NE(all->grammar.find("lookup_order"), std::string::npos);
  o.forced_tool = "route";
  auto named = engine::RenderChat(*model_, {{"system", kSystem}, {"user", "Hi."}}, o);
  ASSERT_TRUE(named.ok());
  EXPECT_EQ(named->text, all->text) << "the model still sees every tool";
  EXPECT_EQ(named->grammar.find("lookup_order"), std::string::npos) << "only the named function may be called";
  EXPECT_NE(named->grammar.find("route"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Templates, ToolsTemplate, ::testing::ValuesIn(kTemplates),
                         [](const auto& info) {
                           std::string n = info.param.file;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

// Parallel tool calls: two calls in one answer (Qwen 2.5's format), read
// back in order; the grammar for parallel calls allows more than one.
TEST(ToolsParallel, TwoCallsInOneAnswerAreBothReadBack) {
  if (!fs::is_directory(KVBATCH_TEMPLATES_DIR)) GTEST_SKIP() << "llama.cpp's templates are not installed";
  auto m = Model::Load({ModelWith(kTemplates[0]), 0});
  ASSERT_TRUE(m.ok());
  ChatOptions o;
  o.tools = Tools();
  o.tool_choice = engine::ToolChoice::kRequired;
  auto p = engine::RenderChat(**m, {{"system", kSystem}, {"user", "Route it and look up order 12."}}, o);
  ASSERT_TRUE(p.ok());
  // Several calls inside one <tool_call> block, comma-separated.
  const std::string list = R"((space "," space ()";
  EXPECT_NE(p->grammar.find(list), std::string::npos) << p->grammar;
  const std::string text =
      "<tool_call>\n{\"name\": \"route\", \"arguments\": {\"team\": \"billing\", \"urgent\": false}}\n</tool_call>\n"
      "<tool_call>\n{\"name\": \"lookup_order\", \"arguments\": {\"order\": 12}}\n</tool_call>";
  engine::ParsedReply r = p->parser->Parse(text, false);
  ASSERT_EQ(r.tool_calls.size(), 2u) << r.content;
  EXPECT_EQ(r.tool_calls[0].name, "route");
  EXPECT_EQ(r.tool_calls[1].name, "lookup_order");
  EXPECT_EQ(json::parse(r.tool_calls[1].arguments), json::parse(R"({"order":12})"));
  o.parallel_tool_calls = false;
  auto one = engine::RenderChat(**m, {{"system", kSystem}, {"user", "Route it."}}, o);
  ASSERT_TRUE(one.ok());
  // llama.cpp drops the list for parallel_tool_calls false; its Hermes-style
  // grammar still allows further <tool_call> blocks (README: tools).
  EXPECT_EQ(one->grammar.find(list), std::string::npos) << one->grammar;
}

// Through `kvbatch run` on the Llama 3.1 template, whose calls are JSON
// objects. A random-weight model never starts a call of its own, so the
// lines push it to (logit_bias on the "{" token); from there the grammar
// decides every token.
TEST(ToolsRun, ForcedCallsComeBackAsToolCallsWithValidArguments) {
  if (!fs::is_directory(KVBATCH_TEMPLATES_DIR)) GTEST_SKIP() << "llama.cpp's templates are not installed";
  const std::string& path = ModelWith(kTemplates[2]);
  auto m = Model::Load({path, 0});
  ASSERT_TRUE(m.ok());
  llama_token open = 0;
  ASSERT_EQ(llama_tokenize((*m)->vocab(), "{", 1, &open, 1, false, true), 1);
  fs::path dir = TestDir("tools_run");
  std::vector<json> lines;
  for (int i = 0; i < 6; ++i) {
    json line = ChatLine("t" + std::to_string(i), kSystem, Candidate(i), 120, i % 2 ? 0.8 : 0.0);
    line["body"]["tools"] = ToolsJson();
    line["body"]["parallel_tool_calls"] = false;
    line["body"]["logit_bias"] = {{std::to_string(open), 100}};
    line["body"]["tool_choice"] =
        i < 4 ? json("required") : json{{"type", "function"}, {"function", {{"name", "route"}}}};
    if (i == 1) line["body"]["n"] = 2;
    lines.push_back(line);
  }
  // Tools off: the same biased model writes text, not calls.
  json none = lines[0];
  none["custom_id"] = "none";
  none["body"]["tool_choice"] = "none";
  lines.push_back(none);
  WriteLines(dir / "in.jsonl", lines);
  std::string err;
  ASSERT_EQ(RunKvbatch("run " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " -m " + path +
                           " --threads 1",
                       &err),
            0)
      << err;
  int calls = 0;
  for (const json& out : ReadJsonl(dir / "out.jsonl")) {
    const std::string id = out["custom_id"];
    ASSERT_EQ(out["response"]["status_code"], 200) << out.dump();
    for (const json& choice : out["response"]["body"]["choices"]) {
      const json& msg = choice["message"];
      if (id == "none") {
        EXPECT_FALSE(msg.contains("tool_calls")) << out.dump();
        EXPECT_NE(choice["finish_reason"], "tool_calls");
        continue;
      }
      ASSERT_EQ(choice["finish_reason"], "tool_calls") << out.dump();
      ASSERT_EQ(msg["tool_calls"].size(), 1u) << "parallel_tool_calls is false: " << out.dump();
      const json& call = msg["tool_calls"][0];
      EXPECT_EQ(call["type"], "function");
      EXPECT_EQ(call["id"].get<std::string>().rfind("call_", 0), 0u);
      const std::string name = call["function"]["name"];
      const std::string args = call["function"]["arguments"];
      if (id == "t4" || id == "t5") {
        EXPECT_EQ(name, "route") << "tool_choice named route";
      }
      if (name == "route") {
        EXPECT_EQ(ValidateRoute(args), "") << args;
      } else {
        ASSERT_EQ(name, "lookup_order");
        json v = json::parse(args);
        EXPECT_TRUE(v["order"].is_number_integer() && v["order"] >= 1 && v["order"] <= 999) << args;
      }
      EXPECT_TRUE(msg["content"].is_null()) << out.dump();
      ++calls;
    }
  }
  EXPECT_EQ(calls, 7);  // 6 lines, one with n = 2
}

#endif  // KVBATCH_HAVE_LLAMA_COMMON

}  // namespace
}  // namespace kvb::testing
