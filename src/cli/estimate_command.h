// `kvbatch estimate`: what a batch will cost before it runs. Validates and
// tokenizes every line, measures how much prefix sharing saves, sizes the KV
// cache per parallel sequence, and projects the wall time from a short
// calibration on the real engine (a sample of the file's own requests).
#pragma once

#include <cstdint>
#include <string>

#include "engine/engine.h"

namespace kvb::cli {

struct EstimateOptions {
  std::string input;
  std::string model;
  // From -m as resolved (models/model_store.h): its name and where it came from.
  std::string model_name;
  std::string model_source = "path";
  bool json = false;
  double watts = 0;          // > 0: energy in kWh
  double cost_per_hour = 0;  // > 0: cost, in the user's currency
  int32_t sample = 0;        // calibration requests (0: 2 x the engine's parallel sequences)
  int32_t n_gpu_layers = -1;
  int32_t default_max_tokens = 0;
  engine::EngineOptions engine;
};

// Exit code: 0, 1 runtime error, 2 no valid line.
int Estimate(const EstimateOptions& options);

}  // namespace kvb::cli
