// `kvbatch serve`: the OpenAI Files + Batches API (and online completions)
// over HTTP, on a durable store: SQLite in the data directory (one process),
// or PostgreSQL (--store postgresql://...) shared with other API nodes and
// workers. Batches survive a crash: any node continues them from their
// committed results. `kvbatch worker` is a node with an engine and no HTTP.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "api/server.h"
#include "engine/engine.h"
#include "worker/driver_options.h"
#include "worker/model_router.h"

namespace kvb::cli {

struct ServeOptions {
  std::string model;     // empty with a PostgreSQL store: an API node without a model
  // From -m as resolved (models/model_store.h): its name and where it came from.
  std::string model_name;
  std::string model_source = "path";
  // -m given more than once: the other models (ModelRouter), loaded on
  // first use, at most max_models at once (0: as memory allows).
  std::vector<worker::ModelSpec> more_models;
  int32_t max_models = 0;
  std::string data_dir;  // kvbatch.db and files/ (SQLite); a local cache (PostgreSQL)
  std::string store;     // empty: SQLite in data_dir; postgresql://...: PostgreSQL
  int32_t n_gpu_layers = -1;
  // One engine per entry ("cpu" or a GPU index), all fed by one driver
  // (data parallel); empty: one engine where llama.cpp puts it.
  std::vector<std::string> devices;
  api::ServerOptions server;
  engine::EngineOptions engine;
  worker::DriverOptions driver;
  // worker: >= 0 serves GET /metrics on this port (serve has it on its API port).
  int metrics_port = -1;
  std::string metrics_host = "127.0.0.1";
};

// Returns the process exit code (0 after SIGINT/SIGTERM, 1 on errors).
int Serve(const ServeOptions& options);
// `kvbatch worker`: the same without the API (only --metrics-port); needs a
// PostgreSQL store.
int Worker(const ServeOptions& options);

}  // namespace kvb::cli
