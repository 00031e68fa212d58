// libFuzzer entry point for line_target.h (see there for what it checks).
#include "line_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvb::fuzz::FuzzLine(data, size);
  return 0;
}
