// NVIDIA's management library, loaded at run time when present
// (libnvidia-ml.so.1 comes with the driver): GPU utilisation, temperature,
// power and memory for /metrics. Never a build dependency; without the
// library (no NVIDIA driver, a CPU machine) Available() is false.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvb::metrics {

struct GpuSample {
  int index = 0;
  std::string name;
  double utilization = -1;   // 0..1 over the last sample period; -1 unknown
  double temperature_c = -1;
  double power_w = -1;
  int64_t memory_used = -1;  // bytes
  int64_t memory_total = -1;
};

class Nvml {
 public:
  // The process-wide instance, loaded on first use (thread-safe).
  static Nvml& Get();
  bool Available() const { return available_; }
  // One sample per GPU; empty when not available.
  std::vector<GpuSample> Sample() const;

 private:
  Nvml();
  bool available_ = false;
  void* lib_ = nullptr;
  unsigned count_ = 0;
};

}  // namespace kvb::metrics
