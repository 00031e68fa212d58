#include "metrics/nvml.h"

#include <dlfcn.h>

namespace kvb::metrics {

namespace {

// The few NVML declarations used (nvml.h's ABI, stable since NVML 4).
using nvmlReturn_t = int;
using nvmlDevice_t = struct nvmlDevice_st*;
struct nvmlUtilization_t {
  unsigned gpu;
  unsigned memory;
};
struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
constexpr nvmlReturn_t kSuccess = 0;
constexpr int kTemperatureGpu = 0;

struct Api {
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*count)(unsigned*) = nullptr;
  nvmlReturn_t (*handle)(unsigned, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*name)(nvmlDevice_t, char*, unsigned) = nullptr;
  nvmlReturn_t (*utilization)(nvmlDevice_t, nvmlUtilization_t*) = nullptr;
  nvmlReturn_t (*temperature)(nvmlDevice_t, int, unsigned*) = nullptr;
  nvmlReturn_t (*power)(nvmlDevice_t, unsigned*) = nullptr;  // milliwatts
  nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
};
Api api;

template <typename F>
bool Load(void* lib, const char* symbol, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, symbol));
  return *out != nullptr;
}

}  // namespace

Nvml& Nvml::Get() {
  static Nvml instance;
  return instance;
}

Nvml::Nvml() {
  lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib_ == nullptr) return;
  const bool loaded = Load(lib_, "nvmlInit_v2", &api.init) && Load(lib_, "nvmlDeviceGetCount_v2", &api.count) &&
                      Load(lib_, "nvmlDeviceGetHandleByIndex_v2", &api.handle) &&
                      Load(lib_, "nvmlDeviceGetName", &api.name) &&
                      Load(lib_, "nvmlDeviceGetUtilizationRates", &api.utilization) &&
                      Load(lib_, "nvmlDeviceGetTemperature", &api.temperature) &&
                      Load(lib_, "nvmlDeviceGetPowerUsage", &api.power) &&
                      Load(lib_, "nvmlDeviceGetMemoryInfo", &api.memory);
  if (!loaded || api.init() != kSuccess || api.count(&count_) != kSuccess) return;
  available_ = true;
}

std::vector<GpuSample> Nvml::Sample() const {
  std::vector<GpuSample> out;
  if (!available_) return out;
  for (unsigned i = 0; i < count_; ++i) {
    nvmlDevice_t dev = nullptr;
    if (api.handle(i, &dev) != kSuccess) continue;
    GpuSample s;
    s.index = static_cast<int>(i);
    char name[96] = {};
    if (api.name(dev, name, sizeof name) == kSuccess) s.name = name;
    if (nvmlUtilization_t u{}; api.utilization(dev, &u) == kSuccess) s.utilization = u.gpu / 100.0;
    if (unsigned t = 0; api.temperature(dev, kTemperatureGpu, &t) == kSuccess) s.temperature_c = t;
    if (unsigned mw = 0; api.power(dev, &mw) == kSuccess) s.power_w = mw / 1000.0;
    if (nvmlMemory_t m{}; api.memory(dev, &m) == kSuccess) {
      s.memory_used = static_cast<int64_t>(m.used);
      s.memory_total = static_cast<int64_t>(m.total);
    }
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace kvb::metrics
