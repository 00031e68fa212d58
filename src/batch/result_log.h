// Crash-safe, resumable output: the output file (successes) and the error
// file (failures) of a batch, appended one whole line at a time.
//
// Durability contract: each Append* is one write(2) of line + '\n' on an
// O_APPEND descriptor, so a kill -9 loses at most the line being written and
// never interleaves two lines; Sync() adds fdatasync for power loss. On
// Open, a torn tail is cut off and the custom_ids already present become
// answered(), so a restarted run skips them and never writes a line twice.
//
// One writer per file: Open takes an exclusive flock(2) on each file and
// fails with FailedPrecondition while another process holds it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_set>

#include "util/status.h"

namespace kvb::batch {

class ResultLog {
 public:
  // Opens (creating, mode 0644) both files and repairs them: bytes after the
  // last '\n' are truncated, and so is a last complete line that is not a JSON
  // object with a string custom_id. A bad line anywhere else is an IoError
  // (the file was not written by us; nothing is modified). error_path empty,
  // or naming the same file as output_path (compared by inode), means one
  // file receives both kinds of line.
  static StatusOr<ResultLog> Open(const std::string& output_path, const std::string& error_path);

  ResultLog(ResultLog&& other) noexcept;
  ResultLog& operator=(ResultLog&& other) noexcept;
  ResultLog(const ResultLog&) = delete;
  ResultLog& operator=(const ResultLog&) = delete;
  ~ResultLog();

  // custom_ids with a line in either file (found at Open or appended since).
  const std::unordered_set<std::string>& answered() const { return answered_; }
  // Of answered(): lines found at Open whose "error" is not null or whose
  // status_code is not 200 (in either file), plus AppendFailure calls since.
  int64_t failed_count() const { return failed_; }

  // Appends line (one JSON object without '\n', e.g. from SuccessLine /
  // FailureLine / RequestErrorLine) to the output / error file. custom_id
  // must be the line's own. FailedPrecondition, writing nothing, when
  // custom_id is already answered; InvalidArgument if line holds a '\n'.
  // On a failed or short write the partial bytes are truncated away and
  // IoError is returned; if even that fails, every later call fails too.
  Status AppendSuccess(std::string_view custom_id, std::string_view line);
  Status AppendFailure(std::string_view custom_id, std::string_view line);

  // fdatasync both files.
  Status Sync();

  // Rewrites each file with its lines in input order (by line_of(custom_id);
  // a negative result puts the line after all known ones, keeping their
  // order). Atomic per file: a temporary file in the same directory is
  // written, fsynced and renamed over the original, then the directory is
  // fsynced; a crash leaves either the old or the new file, both complete.
  // Streams the bytes; memory is proportional to the number of lines. A file
  // already in order is left untouched. Appending afterwards still works.
  Status Finalize(const std::function<int64_t(std::string_view custom_id)>& line_of);

 private:
  struct File {
    std::string path;  // canonical path (rename must replace the file, not a symlink)
    int fd = -1;
    uint64_t size = 0;  // bytes in the file; we are its only writer
  };

  ResultLog() = default;
  Status Append(File& file, std::string_view custom_id, std::string_view line);
  Status Recover(File& file);
  Status Rewrite(File& file, const std::function<int64_t(std::string_view)>& line_of);
  File& ErrorFile() { return shared_ ? out_ : err_; }
  void CloseAll();

  File out_;
  File err_;             // unused when shared_
  bool shared_ = false;  // failures go to out_
  bool broken_ = false;  // a torn write could not be undone: refuse further appends
  std::unordered_set<std::string> answered_;
  int64_t failed_ = 0;
};

}  // namespace kvb::batch
