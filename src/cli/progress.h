// Progress display for `kvbatch run`: a redrawn bar on a terminal, plain
// periodic lines otherwise (logs, CI).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "engine/scheduler.h"

namespace kvb::cli {

struct ProgressSnapshot {
  int64_t done = 0;      // answered this run (ok or failed)
  int64_t total = 0;     // to answer this run
  int64_t resumed = 0;   // answered by an earlier run
  engine::EngineStats engine;
};

class Progress {
 public:
  Progress(FILE* out, bool quiet, double interval_s);
  // Prints when due (or always with force).
  void Update(const ProgressSnapshot& s, bool force = false);
  void Finish();  // ends the bar's line
  double elapsed() const;

  // "123/400 [=====>    ] 31% | 7.2 req/s | 1.1k tok/s | ETA 0:38 | cache hit 96% | KV 4.2k/32.8k cells (5.1k reserved) | 32 running"
  static std::string Line(const ProgressSnapshot& s, double elapsed_s, int bar_width);

 private:
  FILE* out_;
  bool quiet_;
  bool tty_;
  double interval_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_;
  bool drawn_ = false;
};

std::string HumanCount(double v);     // 1234 -> "1.2k"
std::string HumanDuration(double s);  // 75 -> "1:15"

}  // namespace kvb::cli
