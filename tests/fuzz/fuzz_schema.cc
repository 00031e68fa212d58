// libFuzzer entry point for schema_target.h (see there for what it checks).
#include "schema_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvb::fuzz::FuzzSchema(data, size);
  return 0;
}
