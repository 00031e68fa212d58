#include "engine/prefix_tokens.h"

#include <algorithm>

#include "llama.h"

namespace kvb::engine {

std::vector<std::pair<std::string, Token>> SpecialTokenTexts(const llama_vocab* vocab) {
  std::vector<std::pair<std::string, Token>> out;
  for (Token t = 0; t < llama_vocab_n_tokens(vocab); ++t)
    if (llama_vocab_get_attr(vocab, t) & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED))
      out.emplace_back(llama_vocab_get_text(vocab, t), t);
  return out;
}

PrefixTokens::PrefixTokens(TokenizeFn tokenize, std::vector<std::pair<std::string, Token>> specials, Options options)
    : tokenize_(std::move(tokenize)), specials_(std::move(specials)), options_(options) {
  specials_.erase(std::remove_if(specials_.begin(), specials_.end(), [](const auto& s) { return s.first.empty(); }),
                  specials_.end());
  std::stable_sort(specials_.begin(), specials_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
}

PrefixTokens::PrefixTokens(TokenizeFn tokenize, std::vector<std::pair<std::string, Token>> specials)
    : PrefixTokens(std::move(tokenize), std::move(specials), Options{}) {}

std::pair<int32_t, size_t> PrefixTokens::Boundary(std::string_view text, size_t from) const {
  const size_t last = std::min(text.size(), from + options_.max_gap);
  for (size_t p = from; p < last; ++p)
    for (size_t i = 0; i < specials_.size(); ++i)
      if (text.compare(p, specials_[i].first.size(), specials_[i].first) == 0)
        return {static_cast<int32_t>(i), p + specials_[i].first.size()};
  return {-1, 0};
}

void PrefixTokens::Record(std::string_view start, const std::vector<Token>& tokens, bool fresh, bool checked,
                          bool bad) {
  auto it = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.text == start; });
  if (it == entries_.end()) {
    entries_.push_front(Entry{std::string(start), tokens, 0, false});
    it = entries_.begin();
    if (entries_.size() > options_.capacity) entries_.pop_back();
  }
  if (fresh) ++stats_.misses;
  if (checked) ++it->checked;
  if (bad) {
    it->bad = true;
    ++stats_.mismatches;
  }
}

namespace {

// Where `shared` starts in `text`, looking at most `max_offset` bytes in and
// comparing at most a few times the bytes involved: a hostile text built to
// make a naive search quadratic only loses the cache (npos), never time.
size_t FindBounded(std::string_view text, std::string_view shared, size_t max_offset) {
  if (shared.empty() || text.size() < shared.size()) return std::string_view::npos;
  const size_t last = std::min(text.size() - shared.size(), max_offset);
  size_t budget = 4 * (last + shared.size());
  for (size_t p = 0; p <= last; ++p) {
    size_t k = 0;
    while (k < shared.size() && text[p + k] == shared[k]) ++k;
    if (k == shared.size()) return p;
    if (k + 1 > budget) break;
    budget -= k + 1;
  }
  return std::string_view::npos;
}

}  // namespace

std::vector<Token> PrefixTokens::Tokenize(std::string_view text, std::string_view shared) {
  const size_t at = shared.size() >= options_.min_shared ? FindBounded(text, shared, options_.max_offset)
                                                          : std::string_view::npos;
  const auto [special, end] =
      at == std::string_view::npos ? std::pair<int32_t, size_t>{-1, 0} : Boundary(text, at + shared.size());
  bool usable = special >= 0 && end < text.size();

  // The start's tokens: from the cache, or tokenized now (and checked).
  const std::string_view start = usable ? text.substr(0, end) : std::string_view();
  std::vector<Token> head;
  bool fresh = false, check = false;
  if (usable) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.text == start; });
    if (it != entries_.end() && it->bad) {
      usable = false;
    } else if (it != entries_.end()) {
      entries_.splice(entries_.begin(), entries_, it);
      head = it->tokens;
      check = it->checked < options_.verify_uses;
      ++stats_.hits;
    } else {
      fresh = check = true;
    }
  }
  if (!usable) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.whole;
    }
    return tokenize_(text, true);
  }
  if (fresh) head = tokenize_(start, true);

  // The rest, behind its boundary token, which must come out as itself.
  const auto& [special_text, special_id] = specials_[static_cast<size_t>(special)];
  std::string rest;
  rest.reserve(special_text.size() + text.size() - end);
  rest.append(special_text).append(text.substr(end));
  const std::vector<Token> tail = tokenize_(rest, false);
  bool bad = head.empty() || head.back() != special_id || tail.empty() || tail.front() != special_id;
  std::vector<Token> out;
  if (!bad) {
    out.reserve(head.size() + tail.size() - 1);
    out = head;
    out.insert(out.end(), tail.begin() + 1, tail.end());
  }
  if (check || bad) {
    std::vector<Token> reference = tokenize_(text, true);
    bad = bad || reference != out;
    if (bad) out = std::move(reference);
  }
  std::lock_guard<std::mutex> lock(mu_);
  Record(start, head, fresh, check, bad);
  return out;
}

PrefixTokens::Stats PrefixTokens::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kvb::engine
