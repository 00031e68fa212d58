// The parameter half of batch::ParseRequest (request.cc): a body's
// sampling, stop, logit_bias, logprobs, response_format and metadata
// values, each checked and recorded, the first bad one naming itself.
// Private to src/batch.
#pragma once

#include <cmath>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "batch/request.h"

namespace kvb::batch::params {

using nlohmann::json;

// A JSON value's type in messages ("an object", "a string", ...).
const char* TypeName(const json& v);
// Numbers are dumped for messages; nothing else from the input is echoed raw.
std::string Show(const json& v);

// Records the first bad parameter; every check below is a no-op for absent or
// null fields, which mean "the default".
class Params {
 public:
  explicit Params(const json& body) : body_(body) {}

  bool ok() const { return param_.empty(); }
  const std::string& param() const { return param_; }
  const std::string& message() const { return message_; }

  const json* Get(const char* name) const {
    auto it = body_.find(name);
    return (it == body_.end() || it->is_null()) ? nullptr : &*it;
  }

  void Fail(std::string param, std::string message) {
    if (!ok()) return;
    param_ = std::move(param);
    message_ = std::move(message);
  }

  // A number in [lo, hi] (or (lo, hi] when lo_open) into *out.
  void Number(const char* name, double lo, double hi, bool lo_open, float* out) {
    const json* v = Get(name);
    if (v == nullptr || !ok()) return;
    if (!v->is_number()) return TypeError(name, "a number", *v);
    double d = v->get<double>();
    bool in = (lo_open ? d > lo : d >= lo) && d <= hi;  // false for NaN too
    if (!in) {
      Fail(name, std::string("Invalid '") + name + "': expected a number " + (lo_open ? "greater than " : "between ") +
                     Fmt(lo) + (lo_open ? " and at most " : " and ") + Fmt(hi) + ", but got " + Show(*v) + " instead.");
      return;
    }
    *out = static_cast<float>(d);
  }

  // An integer in [lo, hi]; nullopt when absent or bad (then Fail was called).
  std::optional<int64_t> Integer(const char* name, int64_t lo, int64_t hi) {
    const json* v = Get(name);
    if (v == nullptr || !ok()) return std::nullopt;
    auto i = IntegerValue(*v);
    if (!i) {
      TypeError(name, "an integer", *v);
      return std::nullopt;
    }
    if (*i < lo || *i > hi) {
      Fail(name, std::string("Invalid '") + name + "': expected an integer between " + std::to_string(lo) + " and " +
                     std::to_string(hi) + ", but got " + Show(*v) + " instead.");
      return std::nullopt;
    }
    return i;
  }

  void TypeError(const std::string& name, const char* expected, const json& v) {
    Fail(name, "Invalid type for '" + name + "': expected " + expected + ", but got " + TypeName(v) + " instead.");
  }

  // Integral value (integral floats accepted), saturated to int64.
  static std::optional<int64_t> IntegerValue(const json& v) {
    if (v.is_number_unsigned()) {
      auto u = v.get<uint64_t>();
      return u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                                            : static_cast<int64_t>(u);
    }
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (!std::isfinite(d) || d != std::floor(d)) return std::nullopt;
      if (d >= 9.2e18) return std::numeric_limits<int64_t>::max();
      if (d <= -9.2e18) return std::numeric_limits<int64_t>::min();
      return static_cast<int64_t>(d);
    }
    return std::nullopt;
  }

 private:
  static std::string Fmt(double d) { return Show(json(d == std::floor(d) ? json(static_cast<int64_t>(d)) : json(d))); }

  const json& body_;
  std::string param_;
  std::string message_;
};

// A JSON schema given at `param` (response_format's, a tool's parameters):
// an object within Limits (CheckSchemaLimits), else Fail and nullopt. Its
// text as written in `line` (the whole input line) at the JSON pointer
// `pointer`, key order kept.
std::optional<std::string> SchemaAt(Params& p, const json& schema, const std::string& param, std::string_view line,
                                    const std::string& pointer);

// stop: a string or at most 4 strings (empty ones dropped).
void ParseStop(Params& p, std::vector<std::string>* out);
// logit_bias: {"<token id>": [-100, 100]}.
void ParseLogitBias(Params& p, std::vector<std::pair<engine::Token, float>>* out);
// response_format; `line` is the whole input line (the schema keeps its key order).
void ParseResponseFormat(Params& p, std::string_view line, ParsedRequest* r);
// tools, audio, echo, ...: fields kvbatch cannot honour are a 400, not ignored.
void RejectUnsupported(Params& p, Endpoint endpoint);
void CheckMetadata(Params& p);
// logprobs / top_logprobs in the endpoint's own shape.
void ParseLogprobs(Params& p, Endpoint endpoint, ParsedRequest* r);

}  // namespace kvb::batch::params
