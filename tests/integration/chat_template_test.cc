// Chat prompts come from the GGUF's own template.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace kvb::testing
