// PrefixTokens must give exactly the tokens of whole-text tokenization:
// on a fake tokenizer with llama.cpp's context rules (pieces split at
// special tokens, a leading space after a special one), on one that breaks
// the assumption (its mismatch must be caught), and on every real llama.cpp
// vocabulary shipped with the pinned source.
#include "engine/prefix_tokens.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "llama.h"

namespace kvb::engine {
namespace {

std::string Rubric() {
  std::string s;
  for (int i = 0; i < 60; ++i) s += "Criterion " + std::to_string(i) + ": weigh the evidence carefully. ";
  return s;
}

std::string Chat(const std::string& system, const std::string& user) {
  return "<s>system\n" + system + "</s>\n<s>user\n" + user + "</s>\n<s>assistant\n";
}

// Special tokens are "<s>" (1) and "</s>" (2); other text is one token per
// byte (the byte + 10), and a piece after a special token starts with a
// space token (3), as SPM's space prefix does; BOS (0) when add_special.
std::vector<Token> FakeTokenize(std::string_view text, bool add_special) {
  std::vector<Token> out;
  if (add_special) out.push_back(0);
  bool after_special = true;
  size_t i = 0;
  while (i < text.size()) {
    if (text.compare(i, 4, "</s>") == 0) {
      out.push_back(2), i += 4, after_special = true;
    } else if (text.compare(i, 3, "<s>") == 0) {
      out.push_back(1), i += 3, after_special = true;
    } else {
      if (after_special) out.push_back(3);
      after_special = false;
      out.push_back(10 + static_cast<unsigned char>(text[i++]));
    }
  }
  return out;
}

const std::vector<std::pair<std::string, Token>> kFakeSpecials = {{"<s>", 1}, {"</s>", 2}};

TEST(PrefixTokens, SameTokensAsWholeTextAndTheSharedStartIsTokenizedOnce) {
  int64_t calls = 0;
  int64_t bytes = 0;
  PrefixTokens pt(
      [&](std::string_view t, bool add) {
        ++calls;
        bytes += static_cast<int64_t>(t.size());
        return FakeTokenize(t, add);
      },
      kFakeSpecials);
  const std::string rubric = Rubric();
  for (int i = 0; i < 20; ++i) {
    const std::string text = Chat(rubric, "candidate " + std::to_string(i));
    EXPECT_EQ(pt.Tokenize(text, rubric), FakeTokenize(text, true)) << i;
  }
  const auto st = pt.stats();
  EXPECT_EQ(st.misses, 1);
  EXPECT_EQ(st.hits, 19);
  EXPECT_EQ(st.mismatches, 0);
  // After the checked uses, only the short rest is tokenized.
  EXPECT_LT(bytes, 5 * static_cast<int64_t>(rubric.size()));
}

TEST(PrefixTokens, NoUsableBoundaryFallsBackToTheWholeText) {
  PrefixTokens pt(FakeTokenize, kFakeSpecials);
  const std::string rubric = Rubric();
  const std::string no_special = "system " + rubric + " user hi";
  EXPECT_EQ(pt.Tokenize(no_special, rubric), FakeTokenize(no_special, true));
  const std::string text = Chat(rubric, "hi");
  EXPECT_EQ(pt.Tokenize(text, "short"), FakeTokenize(text, true));             // too short to bother
  EXPECT_EQ(pt.Tokenize(text, rubric + "x"), FakeTokenize(text, true));        // not in the text
  EXPECT_EQ(pt.stats().whole, 3);
}

// A text built to make a naive search quadratic (the shared text almost
// matches at every offset): the search gives up within its budget and the
// whole text is tokenized, with the same result.
TEST(PrefixTokens, AHostileNearMatchGivesUpQuicklyAndStaysCorrect) {
  int64_t calls = 0;
  PrefixTokens pt(
      [&](std::string_view t, bool add) {
        ++calls;
        return FakeTokenize(t, add);
      },
      kFakeSpecials);
  const std::string shared(200000, 'a');
  const std::string text = std::string(60000, 'a') + "b" + std::string(199999, 'a') + "</s>x";
  EXPECT_EQ(pt.Tokenize(text, shared), FakeTokenize(text, true));
  EXPECT_EQ(pt.stats().whole, 1);
  EXPECT_EQ(calls, 1);
}

// A tokenizer whose pieces are not independent (a token merging "</s>\n<s>u"
// across the boundary): the check catches it and the start is retired.
TEST(PrefixTokens, ATokenizerThatMergesAcrossTheBoundaryIsCaughtAndNotUsedAgain) {
  auto merging = [](std::string_view text, bool add) {
    std::vector<Token> out = FakeTokenize(text, add);
    for (size_t i = 0; i + 3 < out.size(); ++i)
      if (out[i] == 2 && out[i + 1] == 3 && out[i + 2] == 10 + '\n' && out[i + 3] == 1) {
        out.erase(out.begin() + static_cast<long>(i), out.begin() + static_cast<long>(i) + 4);
        out.insert(out.begin() + static_cast<long>(i), 99);
      }
    return out;
  };
  PrefixTokens pt(merging, kFakeSpecials);
  const std::string rubric = Rubric();
  for (int i = 0; i < 5; ++i) {
    const std::string text = Chat(rubric, "c" + std::to_string(i));
    EXPECT_EQ(pt.Tokenize(text, rubric), merging(text, true)) << i;
  }
  EXPECT_EQ(pt.stats().mismatches, 1);
  EXPECT_EQ(pt.stats().whole, 4);
}

// A template whose markers are plain text ([INST] and <<SYS>>, as Llama 2's):
// no special token follows the shared text, but the newline after it is a
// split text (the fake tokenizer never joins bytes), and the start is cached.
std::string PlainChat(const std::string& system, const std::string& user) {
  return "[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + user + " [/INST]";
}

PrefixTokens::Options Splits(std::vector<std::string> splits) {
  PrefixTokens::Options o;
  o.splits = std::move(splits);
  return o;
}

TEST(PrefixTokens, ANewlineSplitsAPlainTextTemplateAndGivesTheWholeTextTokens) {
  int64_t bytes = 0;
  PrefixTokens pt(
      [&](std::string_view t, bool add) {
        bytes += static_cast<int64_t>(t.size());
        return FakeTokenize(t, add);
      },
      kFakeSpecials, Splits({"\n"}));
  const std::string rubric = Rubric();
  for (int i = 0; i < 20; ++i) {
    const std::string text = PlainChat(rubric, (i % 2 ? "\n  candidate " : "candidate ") + std::to_string(i));
    EXPECT_EQ(pt.Tokenize(text, rubric), FakeTokenize(text, true)) << i;
  }
  const auto st = pt.stats();
  EXPECT_EQ(st.misses, 1);
  EXPECT_EQ(st.hits, 19);
  EXPECT_EQ(st.whole, 0);
  EXPECT_EQ(st.mismatches, 0);
  EXPECT_LT(bytes, 5 * static_cast<int64_t>(rubric.size()));
  // without split texts there is no boundary: the whole text every time
  PrefixTokens plain(FakeTokenize, kFakeSpecials);
  const std::string text = PlainChat(rubric, "x");
  EXPECT_EQ(plain.Tokenize(text, rubric), FakeTokenize(text, true));
  EXPECT_EQ(plain.stats().whole, 1);
}

// A tokenizer that joins a newline to the "<" after it (a split text that is
// not one for it): the check catches it and the start is retired.
TEST(PrefixTokens, ASplitTextTheTokenizerJoinsIsCaughtAndNotUsedAgain) {
  auto joining = [](std::string_view text, bool add) {
    std::vector<Token> out = FakeTokenize(text, add);
    for (size_t i = 0; i + 1 < out.size(); ++i)
      if (out[i] == 10 + '\n' && out[i + 1] == 10 + '<') {
        out.erase(out.begin() + static_cast<long>(i), out.begin() + static_cast<long>(i) + 2);
        out.insert(out.begin() + static_cast<long>(i), 98);
      }
    return out;
  };
  PrefixTokens pt(joining, kFakeSpecials, Splits({"\n"}));
  const std::string rubric = Rubric();
  for (int i = 0; i < 5; ++i) {
    const std::string text = PlainChat(rubric, "c" + std::to_string(i));
    EXPECT_EQ(pt.Tokenize(text, rubric), joining(text, true)) << i;
  }
  EXPECT_EQ(pt.stats().mismatches, 1);
  EXPECT_EQ(pt.stats().whole, 4);
}

// Calls fn(file name, vocabulary, its tokenizer) for every vocabulary in
// llama.cpp's models/ (the pinned source), each loaded alone; the count.
template <typename Fn>
int ForEachVocabulary(const char* dir, Fn fn) {
  llama_backend_init();
  int seen = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model* m = llama_model_load_from_file(e.path().c_str(), mp);
    if (!m) continue;
    const llama_vocab* v = llama_model_get_vocab(m);
    auto tokenize = [v](std::string_view t, bool add) {
      std::vector<Token> out(t.size() + 16);
      int n = llama_tokenize(v, t.data(), static_cast<int32_t>(t.size()), out.data(), static_cast<int32_t>(out.size()),
                             add, true);
      out.resize(n > 0 ? n : 0);
      return out;
    };
    seen += fn(e.path().filename().string(), v, PrefixTokens::TokenizeFn(tokenize)) ? 1 : 0;
    llama_model_free(m);
  }
  return seen;
}

// Every vocabulary: a chat built from its own special tokens tokenizes the
// same both ways.
TEST(PrefixTokens, RealVocabulariesGiveTheWholeTextTokens) {
  const char* dir = std::getenv("KVBATCH_VOCAB_DIR");
  if (!dir || !*dir) GTEST_SKIP() << "KVBATCH_VOCAB_DIR is not set";
  const int tested = ForEachVocabulary(dir, [](const std::string& name, const llama_vocab* v,
                                               const PrefixTokens::TokenizeFn& tokenize) {
    const auto specials = SpecialTokenTexts(v);
    // Two of its special tokens as the turn markers (end of turn, start of turn).
    std::string end, begin;
    for (const auto& [text, id] : specials) {
      if (text.empty() || id == llama_vocab_bos(v)) continue;
      if (end.empty()) end = text;
      else if (begin.empty() && text != end) begin = text;
    }
    if (end.empty() || begin.empty() || llama_vocab_get_add_eos(v) || llama_vocab_get_add_sep(v)) return false;
    PrefixTokens pt(tokenize, specials);
    const std::string rubric = Rubric() + " Ünïcödé, 数字 ٣ and  double  spaces.";
    for (int i = 0; i < 4; ++i) {
      const std::string text = begin + "system\n" + rubric + end + "\n" + begin + "user\n Candidate #" +
                               std::to_string(i) + " wrote:   code" + end + "\n" + begin + "assistant\n";
      EXPECT_EQ(pt.Tokenize(text, rubric), tokenize(text, true)) << name << " " << i;
    }
    EXPECT_EQ(pt.stats().hits, 3) << name;
    std::printf("[ report ] %s: %lld hits, %lld mismatches\n", name.c_str(),
                static_cast<long long>(pt.stats().hits), static_cast<long long>(pt.stats().mismatches));
    return true;
  });
  EXPECT_GE(tested, 10);
}

// The SPM vocabularies whose newline no token joins (SplitTexts): a
// plain-text template splits after the newline that follows the shared text,
// with the same tokens as the whole text, whatever the rest starts with.
TEST(PrefixTokens, RealSpmVocabulariesSplitAfterANewlineExactly) {
  const char* dir = std::getenv("KVBATCH_VOCAB_DIR");
  if (!dir || !*dir) GTEST_SKIP() << "KVBATCH_VOCAB_DIR is not set";
  const int tested = ForEachVocabulary(dir, [](const std::string& name, const llama_vocab* v,
                                               const PrefixTokens::TokenizeFn& tokenize) {
    const std::vector<std::string> splits = SplitTexts(v);
    if (llama_vocab_type(v) != LLAMA_VOCAB_TYPE_SPM) EXPECT_TRUE(splits.empty()) << name;
    if (splits.empty() || llama_vocab_get_add_eos(v) || llama_vocab_get_add_sep(v)) return false;
    PrefixTokens pt(tokenize, SpecialTokenTexts(v), Splits(splits));
    const std::string rubric = Rubric() + " Ünïcödé, 数字 ٣ and  double  spaces.";
    const std::string users[] = {"Candidate #0 wrote:   code", " leading space", "\n\nnewlines first", "数字 first",
                                 "<<SYS>> again\n"};
    int i = 0;
    for (const std::string& user : users) {
      const std::string text = PlainChat(rubric, user);
      EXPECT_EQ(pt.Tokenize(text, rubric), tokenize(text, true)) << name << " " << i++;
    }
    EXPECT_EQ(pt.stats().hits, 4) << name;
    EXPECT_EQ(pt.stats().mismatches, 0) << name;
    std::printf("[ report ] %s: newline splits, %lld hits\n", name.c_str(), static_cast<long long>(pt.stats().hits));
    return true;
  });
  EXPECT_GE(tested, 1);  // llama-spm at least
}

}  // namespace
}  // namespace kvb::engine
