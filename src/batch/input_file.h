// Streaming index of a Batch input file.
//
// The input may hold 170,000 lines and exceed 1 GB, so nothing here keeps
// bodies in memory: a scan keeps, per line, its offset, length and the small
// keys the scheduler orders by; a body is read back by offset when it runs.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "batch/request.h"
#include "util/status.h"

namespace kvb::batch {

// Default limit on one line's bytes (a line this long is an error, not a crash).
inline constexpr uint64_t kMaxLineBytes = 64ull << 20;

struct InputLine {
  int64_t line_no = 0;  // 1-based physical line number (blank lines count)
  uint64_t offset = 0;  // of the line's first byte
  uint32_t length = 0;  // bytes of the line without its terminator ("\n" or "\r\n")
  std::string custom_id;
  Endpoint endpoint = Endpoint::kChatCompletions;
  uint64_t prefix_hash = 0;
};

// Every non-blank line is in exactly one of valid / errors, so
// valid.size() + errors.size() == total_lines. Both are in line order.
struct InputScan {
  std::vector<InputLine> valid;
  std::vector<LineError> errors;
  int64_t total_lines = 0;  // non-blank lines, i.e. requests
};

// Reads the file sequentially in chunks (never whole) and validates every
// non-blank line with ValidateLine; lines of only whitespace are skipped. A
// custom_id seen on an earlier line (valid or not) makes the later line a
// kDuplicateCustomId error whose message names the first line. A line over
// max_line_bytes (at most 4 GiB - 1) is a kLineTooLong error and is never
// held in memory. Errors: NotFound / IoError for the file itself.
StatusOr<InputScan> ScanInputFile(const std::string& path, uint64_t max_line_bytes = kMaxLineBytes);

// Reads lines back by offset with pread(2): safe to call from several threads.
// Movable, not copyable; owns its file descriptor.
class InputReader {
 public:
  static StatusOr<InputReader> Open(const std::string& path);

  InputReader(InputReader&& other) noexcept;
  InputReader& operator=(InputReader&& other) noexcept;
  InputReader(const InputReader&) = delete;
  InputReader& operator=(const InputReader&) = delete;
  ~InputReader();

  // Exactly the line's bytes (without terminator). IoError if the file is
  // shorter than the line says (it changed since the scan).
  StatusOr<std::string> ReadLine(const InputLine& line) const;

 private:
  explicit InputReader(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// ---- building block shared with result_log ----------------------------------

// One line as ForEachLine sees it.
struct RawLine {
  uint64_t offset = 0;     // of the first byte
  uint64_t length = 0;     // bytes before the '\n' (or before end of file)
  bool terminated = true;  // false only for a last line without '\n'
  bool too_long = false;   // length > max_line_bytes; text is then empty
  std::string_view text;   // the bytes (valid only during the callback)
};

// Calls fn for every line of the open file fd (read with pread from offset 0,
// the fd's position is untouched), including empty lines; a file ending in
// '\n' has no extra empty last line. Stops at the first non-OK status of fn
// and returns it.
Status ForEachLine(int fd, uint64_t max_line_bytes, const std::function<Status(const RawLine&)>& fn);

}  // namespace kvb::batch
