// One way to write files durably, for result logs, finalization and uploads:
// write a temporary file, fsync it, rename it into place, fsync the
// directory. A crash at any point leaves either the old file or the whole
// new one, never a torn one under the final name.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "util/status.h"

namespace kvb::util {

// fsyncs a directory, so a create, rename or unlink in it is durable.
Status SyncDirectory(const std::string& dir);

// Renames `from` onto `to` (copying, then removing `from`, when they are on
// different file systems) and fsyncs the destination's directory. `from`
// must be complete and synced.
Status MoveFileDurably(const std::string& from, const std::string& to);

// Writes `path` atomically: data goes to "<path>.tmp" (buffered); Commit
// syncs it, renames it onto `path` and syncs the directory. Destroyed
// without Commit (or Release), the temporary file is removed.
class AtomicFileWriter {
 public:
  AtomicFileWriter() = default;
  AtomicFileWriter(AtomicFileWriter&& o) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  ~AtomicFileWriter();

  // Creates (truncating) the temporary file "<path><tmp_suffix>" with `mode`.
  Status Open(std::string path, unsigned mode = 0600, std::string_view tmp_suffix = ".tmp");
  Status Append(std::string_view data);
  Status AppendLine(std::string_view line);  // line + '\n'
  // Syncs and closes the temporary file without renaming it: for handing a
  // complete file to Store::PutFile. Returns its path; the caller owns it.
  StatusOr<std::string> Release();
  Status Commit();
  int64_t bytes() const { return bytes_ + static_cast<int64_t>(buf_.size()); }
  const std::string& path() const { return path_; }

 private:
  Status Flush();
  Status SyncClose();

  std::string path_, tmp_;
  int fd_ = -1;
  std::string buf_;
  int64_t bytes_ = 0;  // written to fd_
};

}  // namespace kvb::util
