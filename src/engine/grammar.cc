#include "engine/grammar.h"

#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>
#include <exception>
#include <mutex>
#include <unordered_map>

#include "llama.h"
#include "util/json_depth.h"

#ifdef KVBATCH_HAVE_LLAMA_COMMON
#include "json-schema-to-grammar.h"
#include "json.h"
#endif

namespace kvb::engine {

namespace {

constexpr size_t kMaxCached = 64;

// A small thread-safe memo; cleared when full (jobs use a handful of schemas).
template <typename V>
class Memo {
 public:
  template <typename F>
  V Get(const std::string& key, F compute) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (auto it = map_.find(key); it != map_.end()) return it->second;
    }
    V v = compute();
    std::lock_guard<std::mutex> lock(mu_);
    if (map_.size() >= kMaxCached) map_.clear();
    map_.emplace(key, v);
    return v;
  }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, V> map_;
};

// llama.cpp's converter recurses over the schema: deeper input is refused
// before it (requests are already held to --max-json-depth by batch/).
constexpr int32_t kMaxSchemaDepth = 256;

#ifdef KVBATCH_HAVE_LLAMA_COMMON
// The converter negates integer bounds (int64): the most negative one
// overflows (found by fuzzing). Bounds beyond +-2^62 are refused.
Status CheckIntegerBounds(const std::string& schema) {
  constexpr double kLimit = 4.6e18;
  const nlohmann::json doc = nlohmann::json::parse(schema, nullptr, false);
  std::vector<const nlohmann::json*> todo = {&doc};
  while (!todo.empty()) {
    const nlohmann::json* node = todo.back();
    todo.pop_back();
    if (!node->is_structured()) continue;
    if (node->is_object()) {
      for (const char* key : {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}) {
        auto it = node->find(key);
        if (it != node->end() && it->is_number() && std::fabs(it->get<double>()) > kLimit)
          return Status::InvalidArgument(std::string("the JSON schema's ") + key + " is out of range");
      }
    }
    for (const auto& child : *node) todo.push_back(&child);
  }
  return Status::Ok();
}
#endif

StatusOr<std::string> Convert(const std::string& schema) {
#ifdef KVBATCH_HAVE_LLAMA_COMMON
  if (Status depth = CheckJsonDepth(schema, kMaxSchemaDepth); !depth.ok())
    return Status::InvalidArgument("the JSON schema is too deep: " + depth.message());
  try {
    common_json parsed = common_json::parse(schema);
    if (!parsed.is_object()) return Status::InvalidArgument("the JSON schema must be an object");
    if (Status st = CheckIntegerBounds(schema); !st.ok()) return st;
    // force_gbnf: llama.cpp's own grammar sampler, whatever the build.
    std::string gbnf = json_schema_to_grammar(parsed, /*force_gbnf=*/true);
    if (gbnf.empty()) return Status::InvalidArgument("the JSON schema gives an empty grammar");
    return gbnf;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg.size() > 500) msg = msg.substr(0, 500) + "...";
    return Status::InvalidArgument("unsupported JSON schema: " + msg);
  }
#else
  (void)schema;
  return Status::FailedPrecondition(
      "structured output (response_format json_schema / json_object) needs llama.cpp's common library, "
      "and this kvbatch was built without it");
#endif
}

}  // namespace

StatusOr<std::string> JsonSchemaToGrammar(std::string_view schema_json) {
  static Memo<StatusOr<std::string>> memo;
  std::string key(schema_json);
  return memo.Get(key, [&] { return Convert(key); });
}

StatusOr<std::string> JsonObjectGrammar() { return JsonSchemaToGrammar(R"({"type":"object"})"); }

Status CheckGrammar(const Model& model, const std::string& gbnf) {
  static Memo<bool> memo;
  const std::string key = std::to_string(reinterpret_cast<uintptr_t>(model.vocab())) + '\n' + gbnf;
  const bool ok = memo.Get(key, [&] {
    llama_sampler* s = llama_sampler_init_grammar(model.vocab(), gbnf.c_str(), "root");
    if (s == nullptr) return false;
    llama_sampler_free(s);
    return true;
  });
  if (ok) return Status::Ok();
  return Status::InvalidArgument("the grammar for response_format does not parse");
}

}  // namespace kvb::engine
