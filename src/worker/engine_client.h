// What the batch driver needs from an engine: turn a parsed request into an
// engine request, run requests, cancel them. EngineHub implements it on a
// real llama.cpp engine; tests implement it with a fake (no model), so the
// driver's claims, commits and lifecycle are tested without llama.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "batch/prepare.h"
#include "batch/request.h"
#include "engine/types.h"

namespace kvb::worker {

struct RequestCallbacks {
  // Both run on the engine thread: keep them short (hand off to a queue).
  std::function<void(int32_t choice, std::string_view text)> on_delta;  // streaming requests only
  std::function<void(engine::Result&&)> on_result;                      // exactly once per request
  // The engine starts running it (may come again after a requeue). The
  // engine admits several requests per step: after the on_admit of each, it
  // calls the client's admit flush (EngineClient::SetAdmitFlush) once, before
  // their first token, so their records can be written together.
  std::function<void()> on_admit;
};

// RequestFailure::code from Prepare for a request whose model cannot load
// until another one goes idle (ModelRouter): not an answer; the caller keeps
// the request and offers it again later.
inline constexpr char kModelBusy[] = "model_busy";

class EngineClient {
 public:
  virtual ~EngineClient() = default;
  // batch::PrepareRequest with this engine's model; the request gets a fresh id.
  virtual std::variant<engine::Request, batch::RequestFailure> Prepare(batch::ParsedRequest&& request,
                                                                       int32_t default_max_tokens) = 0;
  // Queued together, so their shared prefixes are found.
  virtual void SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests) = 0;
  // The request's on_result still comes (status Cancelled, unless it finished first).
  virtual void Cancel(uint64_t id) = 0;
  // Runs on the engine thread after the on_admit callbacks of one step, before
  // those requests decode anything. One per client (the batch runner's).
  virtual void SetAdmitFlush(std::function<void()> flush) = 0;
  virtual int32_t max_seqs() const = 0;
  virtual std::string model_name() const = 0;
  // The model a prepared request runs on (several models: see ModelRouter).
  virtual std::string ModelOf(uint64_t /*id*/) const { return model_name(); }
};

}  // namespace kvb::worker
