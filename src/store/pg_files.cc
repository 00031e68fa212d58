// PgStore: file records and their content, kept in the database in pieces
// of 1 MiB (file_chunks) so that no call holds a whole file in memory and
// every node can read every file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "store/pg_internal.h"
#include "store/pg_store.h"

namespace kvb::store {

using pg::Conn;
using pg::Mode;
using pg::Params;

namespace {

constexpr int64_t kPieceBytes = int64_t{1} << 20;

constexpr const char* kFileColumns = "id, filename, purpose, bytes, created_at, expires_at";

FileRecord ReadFileRecord(const pg::Result& r, int row) {
  FileRecord f;
  f.id = r.Str(row, 0);
  f.filename = r.Str(row, 1);
  f.purpose = r.Str(row, 2);
  f.bytes = r.Int(row, 3);
  f.created_at = r.Int(row, 4);
  f.expires_at = r.Int(row, 5);
  return f;
}

Status NoFile(std::string_view id) { return Status::NotFound("no file " + std::string(id)); }

Status Errno(const std::string& what) { return Status::IoError(what + ": " + std::strerror(errno)); }

// Closes a descriptor when it goes out of scope.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads up to `n` bytes (fewer only at the end of the file).
ssize_t ReadFull(int fd, char* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, buf + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(got);
}

bool WriteFull(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t w = ::write(fd, data.data(), data.size());
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    data.remove_prefix(static_cast<size_t>(w));
  }
  return true;
}

// One piece of a file's content, or bytes [from, from + len) of it.
StatusOr<pg::Result> ReadPiece(Conn& conn, std::string_view id, int64_t seq, int64_t from, int64_t len) {
  auto r = conn.Exec("SELECT substring(data FROM $3 FOR $4) FROM file_chunks WHERE file_id = $1 AND seq = $2",
                     Params().Text(id).Int32(static_cast<int32_t>(seq)).Int32(static_cast<int32_t>(from + 1))
                         .Int32(static_cast<int32_t>(len)));
  if (!r.ok()) return r.status();
  if (r->rows() == 0)
    return Status::Internal("file " + std::string(id) + ": content piece " + std::to_string(seq) + " is missing");
  return r;
}

}  // namespace

namespace pg {

Status InsertFile(Conn& conn, const FileRecord& f, const std::string& local_path) {
  if (!IsText(f.id) || !IsText(f.purpose))
    return Status::InvalidArgument("file " + f.id + ": id and purpose must be valid UTF-8 text");
  Fd in{::open(local_path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (in.fd < 0) return Errno("open " + local_path);
  struct stat st {};
  if (::fstat(in.fd, &st) != 0) return Errno("stat " + local_path);
  if (st.st_size != f.bytes)
    return Status::InvalidArgument("file " + f.id + ": " + local_path + " has " + std::to_string(st.st_size) +
                                   " bytes, its record says " + std::to_string(f.bytes));
  auto ins = conn.Exec("INSERT INTO files (" + std::string(kFileColumns) + ") VALUES ($1, $2, $3, $4, $5, $6)",
                       Params().Text(f.id).Bytes(f.filename).Text(f.purpose).Int(f.bytes).Int(f.created_at)
                           .Int(f.expires_at));
  if (!ins.ok()) {
    if (conn.sqlstate() == "23505") return Status::InvalidArgument("file " + f.id + " already exists");
    return ins.status();
  }
  // Piece by piece: one buffer of 1 MiB, whatever the file's size.
  std::string buf(static_cast<size_t>(kPieceBytes), '\0');
  int64_t total = 0;
  for (int32_t seq = 0;; ++seq) {
    ssize_t n = ReadFull(in.fd, buf.data(), buf.size());
    if (n < 0) return Errno("read " + local_path);
    if (n == 0) break;
    total += n;
    auto piece = conn.Exec("INSERT INTO file_chunks (file_id, seq, data) VALUES ($1, $2, $3)",
                           Params().Text(f.id).Int32(seq).Bytes(std::string_view(buf.data(), static_cast<size_t>(n))));
    if (!piece.ok()) return piece.status();
  }
  if (total != f.bytes)
    return Status::InvalidArgument("file " + f.id + ": " + local_path + " changed while it was stored");
  return Status::Ok();
}

StatusOr<bool> FileStored(Conn& conn, const FileRecord& f) {
  auto r = conn.Exec("SELECT 1 FROM files WHERE id = $1 AND bytes = $2 AND created_at = $3",
                     Params().Text(f.id).Int(f.bytes).Int(f.created_at));
  if (!r.ok()) return r.status();
  return r->rows() > 0;
}

}  // namespace pg

Status PgStore::PutFile(const FileRecord& file, const std::string& local_path) {
  Status s = pg::Run(*pool_, "put file", Mode::kTransaction, [&](Conn& conn, bool after_unknown_commit) -> Status {
    if (after_unknown_commit) {
      auto stored = pg::FileStored(conn, file);
      if (!stored.ok()) return stored.status();
      if (*stored) return Status::Ok();
    }
    return pg::InsertFile(conn, file, local_path);
  });
  if (!s.ok()) return s;
  ::unlink(local_path.c_str());  // committed: the content is in the database
  return Status::Ok();
}

StatusOr<FileRecord> PgStore::GetFile(std::string_view id) {
  if (!pg::IsText(id)) return NoFile(id);
  FileRecord out;
  Status s = pg::Run(*pool_, "get file", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto r = conn.Exec("SELECT " + std::string(kFileColumns) + " FROM files WHERE id = $1", Params().Text(id));
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return NoFile(id);
    out = ReadFileRecord(*r, 0);
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<std::vector<FileRecord>> PgStore::ListFiles(std::string_view purpose, std::string_view after, int limit,
                                                     bool ascending) {
  std::vector<FileRecord> out;
  if (limit <= 0 || !pg::IsText(purpose) || !pg::IsText(after)) return out;
  // Keyset pagination on (created_at, seq); seq (insertion order) breaks
  // ties within a second. An `after` that does not exist compares with a
  // NULL row and matches nothing: an empty page. Every value is a parameter;
  // only constant fragments are joined.
  std::string sql = "SELECT " + std::string(kFileColumns) + " FROM files WHERE ($2 = '' OR purpose = $2)";
  if (!after.empty())
    sql += ascending ? " AND (created_at, seq) > (SELECT created_at, seq FROM files WHERE id = $3)"
                     : " AND (created_at, seq) < (SELECT created_at, seq FROM files WHERE id = $3)";
  sql += ascending ? " ORDER BY created_at, seq" : " ORDER BY created_at DESC, seq DESC";
  sql += " LIMIT $1";
  Params p;
  p.Int(limit).Text(purpose);
  if (!after.empty()) p.Text(after);
  Status s = pg::Run(*pool_, "list files", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto r = conn.Exec(sql, p);
    if (!r.ok()) return r.status();
    out.clear();
    for (int i = 0; i < r->rows(); ++i) out.push_back(ReadFileRecord(*r, i));
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return out;
}

Status PgStore::DeleteFile(std::string_view id) {
  if (!pg::IsText(id)) return NoFile(id);
  // The content goes with the record (ON DELETE CASCADE), in one statement.
  return pg::Run(*pool_, "delete file", Mode::kStatements, [&](Conn& conn, bool after_unknown_commit) -> Status {
    auto r = conn.Exec("DELETE FROM files WHERE id = $1", Params().Text(id));
    if (!r.ok()) return r.status();
    // A retry after a lost COMMIT finds nothing left: our delete did it.
    if (r->Affected() == 0 && !after_unknown_commit) return NoFile(id);
    return Status::Ok();
  });
}

Status PgStore::ReadFile(std::string_view id, int64_t offset, int64_t max_bytes, std::string* out) {
  if (offset < 0 || max_bytes < 0) return Status::InvalidArgument("read file: negative offset or length");
  if (!pg::IsText(id)) return NoFile(id);
  const size_t start_size = out->size();
  // One snapshot: a file deleted meanwhile is read whole or not at all.
  return pg::Run(*pool_, "read file", Mode::kSnapshot, [&](Conn& conn, bool) -> Status {
    out->resize(start_size);  // a retry starts over
    auto r = conn.Exec("SELECT bytes FROM files WHERE id = $1", Params().Text(id));
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return NoFile(id);
    const int64_t size = r->Int(0, 0);
    const int64_t end = offset >= size ? offset : offset + std::min(max_bytes, size - offset);
    // Only the pieces covering [offset, end), each cut to the range.
    for (int64_t pos = offset; pos < end;) {
      const int64_t seq = pos / kPieceBytes;
      const int64_t from = pos - seq * kPieceBytes;
      const int64_t len = std::min(end, (seq + 1) * kPieceBytes) - pos;
      auto piece = ReadPiece(conn, id, seq, from, len);
      if (!piece.ok()) return piece.status();
      std::string_view data = piece->View(0, 0);
      if (static_cast<int64_t>(data.size()) != len)
        return Status::Internal("file " + std::string(id) + ": content piece " + std::to_string(seq) + " is short");
      out->append(data);
      pos += len;
    }
    return Status::Ok();
  });
}

StatusOr<std::string> PgStore::LocalFile(std::string_view id, const std::string& cache_dir) {
  // Ids are made by the server ("file-<hex>"); one that could leave the
  // cache directory never names a file here.
  if (id.empty() || id.find('/') != std::string_view::npos || id.front() == '.')
    return Status::InvalidArgument("file id " + std::string(id) + " cannot name a local file");
  if (cache_dir.empty()) return Status::InvalidArgument("a local copy of a file needs a cache directory");
  auto record = GetFile(id);
  if (!record.ok()) return record.status();
  const std::string path = cache_dir + "/" + std::string(id) + ".jsonl";
  // A copy is only ever renamed into place complete, so the right size
  // means it is this file's content (ids are never reused).
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size == record->bytes) return path;

  std::error_code ec;
  std::filesystem::create_directories(cache_dir, ec);
  if (ec) return Status::IoError("create " + cache_dir + ": " + ec.message());
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
  Fd out{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)};
  if (out.fd < 0) return Errno("create " + tmp);

  Status s = pg::Run(*pool_, "copy file", Mode::kSnapshot, [&](Conn& conn, bool) -> Status {
    if (::ftruncate(out.fd, 0) != 0 || ::lseek(out.fd, 0, SEEK_SET) != 0) return Errno("truncate " + tmp);
    for (int64_t seq = 0; seq * kPieceBytes < record->bytes; ++seq) {
      auto piece = ReadPiece(conn, id, seq, 0, kPieceBytes);
      if (!piece.ok()) return piece.status();
      if (!WriteFull(out.fd, piece->View(0, 0))) return Errno("write " + tmp);
    }
    return Status::Ok();
  });
  if (s.ok() && ::fstat(out.fd, &st) == 0 && st.st_size != record->bytes)
    s = Status::Internal("file " + std::string(id) + ": stored content has " + std::to_string(st.st_size) +
                         " bytes, its record says " + std::to_string(record->bytes));
  // Durable before it is visible under its name: a crash cannot leave a
  // complete-looking partial copy.
  if (s.ok() && ::fsync(out.fd) != 0) s = Errno("fsync " + tmp);
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) s = Errno("rename " + tmp);
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  Fd dir{::open(cache_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd >= 0) ::fsync(dir.fd);
  return path;
}

}  // namespace kvb::store
