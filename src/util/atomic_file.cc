#include "util/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

namespace kvb::util {
namespace {

constexpr size_t kBufferBytes = 1 << 20;

Status Errno(const char* what, const std::string& path) {
  return Status::IoError(std::string(what) + " " + path + ": " + std::strerror(errno));
}

Status WriteAll(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot write", path);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

}  // namespace

Status SyncDirectory(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open directory", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  return rc == 0 ? Status::Ok() : Errno("cannot sync directory", dir);
}

Status MoveFileDurably(const std::string& from, const std::string& to) {
  const std::string dir = std::filesystem::path(to).parent_path().string();
  if (::rename(from.c_str(), to.c_str()) == 0) return SyncDirectory(dir);
  if (errno != EXDEV) return Errno("cannot rename onto", to);
  // Another file system: copy through a temporary name, then switch.
  AtomicFileWriter w;
  if (Status s = w.Open(to); !s.ok()) return s;
  int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return Errno("cannot open", from);
  std::string buf(kBufferBytes, '\0');
  Status s;
  for (;;) {
    ssize_t n = ::read(in, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) s = Errno("cannot read", from);
    if (n <= 0) break;
    if (s = w.Append(std::string_view(buf.data(), static_cast<size_t>(n))); !s.ok()) break;
  }
  ::close(in);
  if (s.ok()) s = w.Commit();
  if (s.ok()) ::unlink(from.c_str());
  return s;
}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& o) noexcept
    : path_(std::move(o.path_)),
      tmp_(std::move(o.tmp_)),
      fd_(std::exchange(o.fd_, -1)),
      buf_(std::move(o.buf_)),
      bytes_(o.bytes_) {
  o.tmp_.clear();
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

Status AtomicFileWriter::Open(std::string path, unsigned mode, std::string_view tmp_suffix) {
  path_ = std::move(path);
  tmp_ = path_ + std::string(tmp_suffix);
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd_ < 0) {
    Status s = Errno("cannot create", tmp_);
    tmp_.clear();
    return s;
  }
  // Exactly `mode`, whatever the umask.
  if (::fchmod(fd_, static_cast<mode_t>(mode)) != 0) return Errno("cannot chmod", tmp_);
  return Status::Ok();
}

Status AtomicFileWriter::Append(std::string_view data) {
  if (fd_ < 0) return Status::FailedPrecondition("file " + path_ + " is not open");
  buf_.append(data);
  return buf_.size() >= kBufferBytes ? Flush() : Status::Ok();
}

Status AtomicFileWriter::AppendLine(std::string_view line) {
  if (Status s = Append(line); !s.ok()) return s;
  return Append("\n");
}

Status AtomicFileWriter::Flush() {
  if (Status s = WriteAll(fd_, buf_.data(), buf_.size(), tmp_); !s.ok()) return s;
  bytes_ += static_cast<int64_t>(buf_.size());
  buf_.clear();
  return Status::Ok();
}

Status AtomicFileWriter::SyncClose() {
  if (fd_ < 0) return Status::FailedPrecondition("file " + path_ + " is not open");
  Status s = Flush();
  if (s.ok() && ::fsync(fd_) != 0) s = Errno("cannot sync", tmp_);
  ::close(fd_);
  fd_ = -1;
  return s;
}

StatusOr<std::string> AtomicFileWriter::Release() {
  if (Status s = SyncClose(); !s.ok()) return s;
  return std::exchange(tmp_, std::string());
}

Status AtomicFileWriter::Commit() {
  if (Status s = SyncClose(); !s.ok()) return s;
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) return Errno("cannot rename onto", path_);
  tmp_.clear();
  return SyncDirectory(std::filesystem::path(path_).parent_path().string());
}

}  // namespace kvb::util
