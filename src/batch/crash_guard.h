// Poison requests (DESIGN.md section 5): some crashes come from outside our
// code (the OOM killer, an abort inside llama.cpp), so a request is recorded
// as in flight when the engine starts it (Scheduler::AdmitFn), before its
// first token, and unrecorded when the engine is done with it. After a
// crash the requests still recorded are suspects: each runs again alone
// (engine::Request::isolate: the scheduler admits nothing beside it). A
// request in flight during kMaxCrashes crashes is answered with a
// kCrashedEngine error line instead of being run again, so the process
// comes back and the rest of its batch completes.
//
// `kvbatch serve` keeps the records in its store (Store::MarkInFlight);
// `kvbatch run` in a CrashJournal beside its output file.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "util/status.h"

namespace kvb::batch {

inline constexpr int32_t kMaxCrashes = 2;
inline constexpr char kCrashedEngine[] = "request_crashed_engine";

// The error message of a request failed after `crashes` crashes.
std::string CrashedMessage(int32_t crashes);

// Test-only: KVBATCH_TEST_CRASH_ON=<custom_id> makes the engine abort the
// process when that request is admitted (engine::Request::test_abort).
bool TestCrashOn(std::string_view custom_id);

// `kvbatch run`'s record of requests in flight: <output>.inflight, an
// append-only text file. "s" starts a process's session, "+ <line>" marks
// an input line the engine starts running, "- <line>" one it is done with,
// "e" ends a session cleanly (done or
// interrupted), "c <line> <n>" carries earlier crash counts. A session
// without "e" crashed. Writes go to the OS before the request runs, so they
// survive the process dying (not a power loss, which kills no request).
class CrashJournal {
 public:
  // Reads what earlier sessions left (lines in `answered` are dropped),
  // rewrites the file compactly and starts a new session.
  static StatusOr<CrashJournal> Open(const std::string& path, const std::vector<int64_t>& answered_lines);
  CrashJournal(CrashJournal&& other) noexcept;
  CrashJournal& operator=(CrashJournal&&) = delete;
  ~CrashJournal();

  // Crashes each unanswered line was in flight for (absent: none).
  const std::unordered_map<int64_t, int32_t>& crashes() const { return crashes_; }
  Status MarkInFlight(const std::vector<int64_t>& lines);
  // The engine is done with it (its answer may not be written yet).
  Status MarkDone(int64_t line);
  // The session ended without a crash (finished or interrupted).
  Status EndSession();
  // Everything is answered: the journal is no longer needed.
  Status Remove();

 private:
  CrashJournal(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  Status Append(const std::string& text);

  std::string path_;
  std::mutex mu_;  // MarkInFlight comes from the engine thread
  int fd_ = -1;
  std::unordered_map<int64_t, int32_t> crashes_;
};

}  // namespace kvb::batch
