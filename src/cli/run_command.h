// `kvbatch run`: an OpenAI Batch input file in, output and error files out,
// through the engine in this process. Resumable: rerun with the same
// arguments after a crash and it answers only what is missing. The engine is
// fed by the batch driver's ChunkRunner, as in `serve`, over a RunStore
// (worker/run_store.h) whose durable parts are the output, error and
// journal files.
#pragma once

#include <cstdint>
#include <string>

#include "engine/engine.h"
#include "worker/model_router.h"

namespace kvb::cli {

struct RunOptions {
  std::string input;
  std::string output;
  std::string errors;  // empty: failures go to the output file
  std::string model;
  // From -m as resolved (models/model_store.h): its name and where it came from.
  std::string model_name;
  std::string model_source = "path";
  // -m given more than once: the other models (ModelRouter), loaded on
  // first use, at most max_models at once (0: as memory allows).
  std::vector<worker::ModelSpec> more_models;
  int32_t max_models = 0;
  bool skip_invalid = false;
  bool quiet = false;
  double progress_interval = 10.0;  // seconds between lines when not on a terminal
  int32_t n_gpu_layers = -1;
  // max_tokens for requests that give none; 0: until the context is full
  // (OpenAI's meaning). Admission reserves a request's worst case, so without
  // it a request may hold a whole context's worth of KV cells.
  int32_t default_max_tokens = 0;
  engine::EngineOptions engine;
  // >= 0: serve GET /metrics on this port during the run (0: any free port).
  int metrics_port = -1;
  std::string metrics_host = "127.0.0.1";
};

// Returns the process exit code: 0 all answered (some may have failed
// requests), 1 runtime error, 2 invalid input, 130 interrupted.
int Run(const RunOptions& options);

}  // namespace kvb::cli
