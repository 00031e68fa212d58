// Chat prompts come from the GGUF's own template.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "engine/chat_tools.h"
#include "engine/model.h"
#include "fixtures.h"

namespace kvb::testing {
namespace {

using engine::Model;

TEST(ChatTemplate, ChatMlTemplateRendersTheConversationAndTheAssistantTurn) {
  auto m = Model::Load({TinyModel(), 0});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto p = (*m)->FormatChat({{"system", "Be brief."}, {"user", "Score Ada."}});
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(*p, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nScore Ada.<|im_end|>\n<|im_start|>assistant\n");
}

// A template llama.cpp's built-in detection does not know: rendered as
// Jinja when kvbatch is built with llama.cpp's common library, otherwise a
// clear error (which `kvbatch run` turns into a 400 line).
TEST(ChatTemplate, CustomJinjaTemplateIsRenderedOrClearlyRefused) {
  auto dir = TestDir("chat_template");
  auto opts = tools::ModelPreset("tiny");
  opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/ggml-vocab-llama-spm.gguf";
  opts->out_path = (dir / "custom.gguf").string();
  opts->chat_template =
      "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}[ASSISTANT] {% endif %}";
  ASSERT_TRUE(tools::GenerateModel(*opts).ok());
  auto m = Model::Load({opts->out_path, 0});
  ASSERT_TRUE(m.ok());
  auto p = (*m)->FormatChat({{"system", "Be brief."}, {"user", "Score Ada."}});
#ifdef KVBATCH_HAVE_LLAMA_COMMON
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(*p, "[SYSTEM] Be brief.\n[USER] Score Ada.\n[ASSISTANT] ");
#else
  EXPECT_EQ(p.status().code(), StatusCode::kFailedPrecondition);
#endif
}

// Every chat template llama.cpp ships (models/templates/, installed by
// scripts/llama.sh): a system + user conversation renders, and two requests
// sharing the system message share a token prefix covering all of it, so
// the engine computes it once. Templates that cannot keep that promise are
// listed here with the reason; any other failure fails the test.
TEST(ChatTemplate, EveryShippedTemplateRendersAndKeepsTheSystemPrefixShared) {
#ifndef KVBATCH_HAVE_LLAMA_COMMON
  GTEST_SKIP() << "built without llama.cpp's common library: templates are not rendered as Jinja";
#else
  const std::filesystem::path dir = KVBATCH_TEMPLATES_DIR;
  if (dir.empty() || !std::filesystem::is_directory(dir))
    GTEST_SKIP() << "llama.cpp's models/templates are not installed (rerun scripts/llama.sh)";
  // Known: why these templates cannot share the system message's tokens.
  const std::map<std::string, std::string> known = {};
  // Known: why these templates cannot render a tools conversation that
  // keeps the system message's tokens shared.
  const std::map<std::string, std::string> known_tools = {};
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".jinja") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  ASSERT_GT(files.size(), 20u);
  const std::string system =
      "You grade job candidates against the rubric below. Score each from 0 to 100 and explain briefly. "
      "Rubric: experience, clarity, evidence of impact, and fit with the role.";
  auto work = TestDir("templates");
  auto opts = tools::ModelPreset("tiny");
  opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/ggml-vocab-llama-spm.gguf";
  std::ostringstream report, tools_report;
  int rendered = 0, shared = 0, tools_ok = 0, no_tools = 0;
  std::vector<std::string> unexpected;
  for (const auto& file : files) {
    const std::string name = file.stem().string();
    std::ifstream in(file);
    std::stringstream text;
    text << in.rdbuf();
    opts->chat_template = text.str();
    opts->out_path = (work / "t.gguf").string();
    ASSERT_TRUE(tools::GenerateModel(*opts).ok()) << name;
    auto m = Model::Load({opts->out_path, 0});
    ASSERT_TRUE(m.ok()) << name;
    const std::string ua = "Candidate Ada: ten years of logistics.", ub = "Candidate Bo: two years, strong references.";
    // Two prompts that differ only in the user message must share every
    // token up to the end of the system message.
    auto share = [&](const StatusOr<std::string>& a, const StatusOr<std::string>& b) -> std::string {
      if (!a.ok() || !b.ok()) return "does not render: " + (a.ok() ? b : a).status().message();
      const auto ta = (*m)->Tokenize(*a), tb = (*m)->Tokenize(*b);
      size_t common = 0;
      while (common < ta.size() && common < tb.size() && ta[common] == tb[common]) ++common;
      const size_t at = a->find(system);
      if (at == std::string::npos) return "the system message does not appear in the prompt";
      const size_t need = (*m)->Tokenize(a->substr(0, at + system.size())).size();
      if (common + 2 < need)  // the last token or two may merge with what follows
        return "only " + std::to_string(common) + " tokens shared, the system message ends at " + std::to_string(need);
      return "ok (" + std::to_string(common) + " of " + std::to_string(ta.size()) + " tokens shared)";
    };
    std::string outcome = share((*m)->FormatChat({{"system", system}, {"user", ua}}),
                                (*m)->FormatChat({{"system", system}, {"user", ub}}));
    if (outcome.rfind("ok", 0) == 0) ++rendered, ++shared;
    else if (outcome.rfind("does not render", 0) != 0) ++rendered;
    // The same with tools (engine::RenderChat): rendered, the tool shown
    // to the model, and the system message's tokens still shared.
    engine::ChatOptions with_tools;
    with_tools.tools = {{"score_candidate", "Record a candidate's score",
                         R"({"type":"object","properties":{"score":{"type":"integer"}},"required":["score"]})"}};
    auto ta = engine::RenderChat(**m, {{"system", system}, {"user", ua}}, with_tools);
    auto tb = engine::RenderChat(**m, {{"system", system}, {"user", ub}}, with_tools);
    std::string tools_outcome =
        share(ta.ok() ? StatusOr<std::string>(ta->text) : StatusOr<std::string>(ta.status()),
              tb.ok() ? StatusOr<std::string>(tb->text) : StatusOr<std::string>(tb.status()));
    const bool takes_tools = engine::TemplateRendersTools(**m);
    if (ta.ok() && ta->text.find("score_candidate") == std::string::npos)
      tools_outcome = std::string("the tools do not appear in the prompt") +
                      (takes_tools ? "" : " (the template does not read `tools`: kvbatch refuses tools for it)");
    if (!takes_tools && tools_outcome.rfind("ok", 0) == 0) tools_outcome = "ok, though llama.cpp's caps say no tools";
    if (!takes_tools) ++no_tools;
    if (tools_outcome.rfind("ok", 0) == 0) ++tools_ok;
    const bool tools_pass = tools_outcome.rfind("ok", 0) == 0;
    if (!tools_pass && takes_tools && known_tools.count(name) == 0) unexpected.push_back(name + " with tools: " + tools_outcome);
    if (tools_pass && known_tools.count(name) != 0) unexpected.push_back(name + " with tools: listed as failing but passes");
    tools_report << "  " << name << ": " << tools_outcome << "\n";
    report << "  " << name << ": " << outcome << "\n";
    const bool ok = outcome.rfind("ok", 0) == 0;
    if (!ok && known.count(name) == 0) unexpected.push_back(name + ": " + outcome);
    if (ok && known.count(name) != 0) unexpected.push_back(name + ": listed as failing but passes");
  }
  std::printf("%zu templates, %d render, %d share the system prefix:\n%s", files.size(), rendered, shared,
              report.str().c_str());
  std::printf("with tools: %d render the tools and share the system prefix; %d templates do not take tools:\n%s",
              tools_ok, no_tools, tools_report.str().c_str());
  EXPECT_TRUE(unexpected.empty()) << [&] {
    std::string s;
    for (const auto& u : unexpected) s += u + "\n";
    return s;
  }();
#endif
}

// The rubric workload's prompts (a long system message, then each
// candidate) through a model made from `opts`, whose rendered prompts hold
// `marker`: after the first prompt, the rendered system part comes from
// PrefixTokens' cache, its checks against whole-text tokenization pass, and
// the tokens are exactly the whole text's.
void ExpectTheSharedStartTokenizedOnce(tools::GenModelOptions opts, const std::string& name,
                                       const std::string& marker) {
  auto dir = TestDir(name);
  opts.out_path = (dir / (name + ".gguf")).string();
  ASSERT_TRUE(tools::GenerateModel(opts).ok());
  auto m = engine::Model::Load({opts.out_path, 0});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const std::string system = Rubric(24);
  for (int i = 0; i < 10; ++i) {
    auto prompt = (*m)->FormatChat({{"system", system}, {"user", Candidate(i)}});
    ASSERT_TRUE(prompt.ok()) << prompt.status().ToString();
    ASSERT_NE(prompt->find(marker), std::string::npos) << *prompt;
    EXPECT_EQ((*m)->Tokenize(*prompt, system), (*m)->Tokenize(*prompt)) << "candidate " << i;
  }
  const engine::PrefixTokens::Stats s = (*m)->prefix_token_stats();
  EXPECT_EQ(s.mismatches, 0);
  EXPECT_EQ(s.whole, 0);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.hits, 9);
}

// A real tokenizer whose chat markers are special tokens (the llama3-8b
// preset's: llama-bpe and Llama 3's format): the start ends at the special
// token after the system message.
TEST(PrefixTokensOnTheRubric, TheSharedStartIsTokenizedOnceAndMatchesWholeText) {
  auto opts = tools::ModelPreset("tiny");
  ASSERT_TRUE(opts.ok());
  auto llama3 = tools::ModelPreset("llama3-8b");
  ASSERT_TRUE(llama3.ok());
  opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/" + llama3->vocab_file;
  opts->chat_template = llama3->chat_template;
  ExpectTheSharedStartTokenizedOnce(*opts, "prefix_tokens_llama3", "<|eot_id|>");
}

// The tiny and bench presets' ChatML markers are plain text in llama-spm: the
// start is cut after the newline that follows the system message (llama-spm
// spells a newline as a byte token, which no merge joins).
TEST(PrefixTokensOnTheRubric, PlainTextChatMlMarkersSplitAfterANewline) {
  auto opts = tools::ModelPreset("tiny");
  ASSERT_TRUE(opts.ok());
  opts->vocab_path = std::string(KVBATCH_VOCAB_DIR) + "/" + opts->vocab_file;
  ExpectTheSharedStartTokenizedOnce(*opts, "prefix_tokens_spm", "<|im_end|>\n<|im_start|>user");
}

}  // namespace
}  // namespace kvb::testing
