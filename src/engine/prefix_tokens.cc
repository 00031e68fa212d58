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

std::vector<std::string> SplitTexts(const llama_vocab* vocab) {
  if (llama_vocab_type(vocab) != LLAMA_VOCAB_TYPE_SPM) return {};
  for (Token t = 0; t < llama_vocab_n_tokens(vocab); ++t) {
    const std::string_view text = llama_vocab_get_text(vocab, t);
    if (text.size() > 1 && text.find('\n') != std::string_view::npos) return {};
  }
  return {"\n"};
}

PrefixTokens::PrefixTokens(TokenizeFn tokenize, std::vector<std::pair<std::string, Token>> specials, Options options)
    : tokenize_(std::move(tokenize)), options_(std::move(options)) {
  for (auto& [text, id] : specials)
    if (!text.empty()) markers_.push_back(Marker{std::move(text), {id}});
  std::stable_sort(markers_.begin(), markers_.end(),
                   [](const Marker& a, const Marker& b) { return a.text.size() > b.text.size(); });
  for (const std::string& split : options_.splits) {
    if (split.empty()) continue;
    std::vector<Token> lead = tokenize_(split, false);
    if (!lead.empty()) markers_.push_back(Marker{split, std::move(lead)});
  }
}

PrefixTokens::PrefixTokens(TokenizeFn tokenize, std::vector<std::pair<std::string, Token>> specials)
    : PrefixTokens(std::move(tokenize), std::move(specials), Options{}) {}

std::pair<int32_t, size_t> PrefixTokens::Boundary(std::string_view text, size_t from) const {
  const size_t last = std::min(text.size(), from + options_.max_gap);
  for (size_t p = from; p < last; ++p)
    for (size_t i = 0; i < markers_.size(); ++i)
      if (text.compare(p, markers_[i].text.size(), markers_[i].text) == 0)
        return {static_cast<int32_t>(i), p + markers_[i].text.size()};
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

  // The rest, behind its boundary, which must come out as its lead (the
  // start's tokens end with the boundary's own).
  const Marker& marker = markers_[static_cast<size_t>(special)];
  std::string rest;
  rest.reserve(marker.text.size() + text.size() - end);
  rest.append(marker.text).append(text.substr(end));
  const std::vector<Token> tail = tokenize_(rest, false);
  const size_t lead = marker.lead.size();
  bool bad = head.empty() || head.back() != marker.lead.back() || tail.size() < lead ||
             !std::equal(marker.lead.begin(), marker.lead.end(), tail.begin());
  std::vector<Token> out;
  if (!bad) {
    out.reserve(head.size() + tail.size() - lead);
    out = head;
    out.insert(out.end(), tail.begin() + static_cast<long>(lead), tail.end());
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
