// libFuzzer entry point for multipart_target.h (see there for what it checks).
#include "multipart_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvb::fuzz::FuzzMultipart(data, size);
  return 0;
}
