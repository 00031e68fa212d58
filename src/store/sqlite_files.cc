// The SQLite store's file content: one file per id in the files directory,
// moved in durably, read by range, removed after its record.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "store/sqlite_store.h"
#include "store/sqlite_util.h"
#include "util/atomic_file.h"

namespace kvb::store {

using sqlite::Prepare;
using sqlite::SqlError;
using sqlite::StepDone;
using sqlite::Transaction;

StatusOr<std::string> SqliteStore::AdoptContent(std::string_view id, const std::string& local_path) {
  if (files_dir_.empty()) return Status::FailedPrecondition("this store has no files directory");
  const std::string path = files_dir_ + "/" + std::string(id) + ".jsonl";
  if (Status s = util::MoveFileDurably(local_path, path); !s.ok()) return s;
  return path;
}

StatusOr<std::string> SqliteStore::ContentPath(std::string_view id) {
  std::lock_guard lock(mu_);
  auto st = Prepare(db_, "SELECT path FROM files WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return st->ColText(0);
  if (rc == SQLITE_DONE) return Status::NotFound("no file " + std::string(id));
  return SqlError(db_, "get file");
}

Status SqliteStore::ReadFile(std::string_view id, int64_t offset, int64_t max_bytes, std::string* out) {
  auto path = ContentPath(id);
  if (!path.ok()) return path.status();
  int fd = ::open(path->c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::IoError("cannot open the content of " + std::string(id));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    ::close(fd);
    return Status::IoError("cannot stat the content of " + std::string(id));
  }
  // Only what is there: a caller may ask for "the rest" with a huge max_bytes.
  const int64_t want = std::clamp<int64_t>(static_cast<int64_t>(info.st_size) - offset, 0, std::max<int64_t>(0, max_bytes));
  const size_t start = out->size();
  out->resize(start + static_cast<size_t>(want));
  size_t got = 0;
  Status s;
  while (got < out->size() - start) {
    ssize_t n = ::pread(fd, out->data() + start + got, out->size() - start - got, static_cast<off_t>(offset) +
                                                                                         static_cast<off_t>(got));
    if (n < 0) {
      s = Status::IoError("cannot read the content of " + std::string(id));
      break;
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  out->resize(start + got);
  return s;
}

StatusOr<std::string> SqliteStore::LocalFile(std::string_view id, const std::string& /*cache_dir*/) {
  return ContentPath(id);
}

Status SqliteStore::DeleteFile(std::string_view id) {
  auto path = ContentPath(id);
  if (!path.ok()) return path.status();
  std::lock_guard lock(mu_);
  Status s = Transaction(db_, [&]() -> Status {
    auto st = Prepare(db_, "DELETE FROM files WHERE id = ?1");
    if (!st.ok()) return st.status();
    st->Text(1, id);
    if (Status s = StepDone(db_, *st, "delete file"); !s.ok()) return s;
    if (sqlite3_changes(db_) == 0) return Status::NotFound("no file " + std::string(id));
    return Status::Ok();
  });
  if (!s.ok()) return s;
  // After the record: a crash in between leaves bytes nobody names, never a
  // record without its content.
  std::error_code ec;
  std::filesystem::remove(*path, ec);
  return Status::Ok();
}

}  // namespace kvb::store
