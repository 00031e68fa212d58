// Chat prompts come from the GGUF's own template.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

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
  std::ostringstream report;
  int rendered = 0, shared = 0;
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
    auto a = (*m)->FormatChat({{"system", system}, {"user", "Candidate Ada: ten years of logistics."}});
    auto b = (*m)->FormatChat({{"system", system}, {"user", "Candidate Bo: two years, strong references."}});
    std::string outcome;
    if (!a.ok() || !b.ok()) {
      outcome = "does not render: " + (a.ok() ? b : a).status().message();
    } else {
      ++rendered;
      const auto ta = (*m)->Tokenize(*a), tb = (*m)->Tokenize(*b);
      size_t common = 0;
      while (common < ta.size() && common < tb.size() && ta[common] == tb[common]) ++common;
      // The shared tokens must reach past the system message in the prompt.
      const size_t at = a->find(system);
      if (at == std::string::npos) {
        outcome = "the system message does not appear in the prompt";
      } else {
        const size_t need = (*m)->Tokenize(a->substr(0, at + system.size())).size();
        if (common + 2 >= need) {  // the last token or two may merge with what follows
          ++shared;
          outcome = "ok (" + std::to_string(common) + " of " + std::to_string(ta.size()) + " tokens shared)";
        } else {
          outcome = "only " + std::to_string(common) + " tokens shared, the system message ends at " +
                    std::to_string(need);
        }
      }
    }
    report << "  " << name << ": " << outcome << "\n";
    const bool ok = outcome.rfind("ok", 0) == 0;
    if (!ok && known.count(name) == 0) unexpected.push_back(name + ": " + outcome);
    if (ok && known.count(name) != 0) unexpected.push_back(name + ": listed as failing but passes");
  }
  std::printf("%zu templates, %d render, %d share the system prefix:\n%s", files.size(), rendered, shared,
              report.str().c_str());
  EXPECT_TRUE(unexpected.empty()) << [&] {
    std::string s;
    for (const auto& u : unexpected) s += u + "\n";
    return s;
  }();
#endif
}

}  // namespace
}  // namespace kvb::testing
