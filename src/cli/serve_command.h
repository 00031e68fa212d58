// `kvbatch serve`: the OpenAI Files + Batches API (and online completions)
// over HTTP, on a durable store in the data directory. Batches survive a
// crash: a restarted server continues them from their committed results.
#pragma once

#include <cstdint>
#include <string>

#include "api/server.h"
#include "engine/engine.h"

namespace kvb::cli {

struct ServeOptions {
  std::string model;
  std::string data_dir;  // holds kvbatch.db and files/
  int32_t n_gpu_layers = -1;
  int32_t window = 0;  // batch requests in the engine at once (0: automatic)
  api::ServerOptions server;
  engine::EngineOptions engine;
};

// Returns the process exit code (0 after SIGINT/SIGTERM, 1 on errors).
int Serve(const ServeOptions& options);

}  // namespace kvb::cli
