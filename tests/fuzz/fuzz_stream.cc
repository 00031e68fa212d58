// libFuzzer entry point for stream_target.h (see there for what it checks).
#include "stream_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvb::fuzz::FuzzStream(data, size);
  return 0;
}
