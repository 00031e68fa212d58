#include "batch/result_log.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>
#include <vector>

#include "batch/input_file.h"
#include "util/atomic_file.h"

namespace kvb::batch {

namespace {

constexpr char kTempSuffix[] = ".kvb-finalize.tmp";

Status ErrnoStatus(const std::string& what, const std::string& path) {
  return Status::IoError(what + " " + path + ": " + std::strerror(errno));
}

// What a result line says about itself; nullopt if it is not one.
struct LineKey {
  std::string custom_id;
  bool failed = false;
};

std::optional<LineKey> ReadKey(std::string_view text) {
  auto doc = nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) return std::nullopt;  // also the "discarded" value of a parse error
  auto id = doc.find("custom_id");
  if (id == doc.end() || !id->is_string() || id->get_ref<const std::string&>().empty()) return std::nullopt;
  LineKey key{id->get<std::string>(), false};
  auto error = doc.find("error");
  auto response = doc.find("response");
  if (error != doc.end() && !error->is_null()) {
    key.failed = true;
  } else if (response == doc.end() || !response->is_object()) {
    key.failed = true;
  } else {
    auto code = response->find("status_code");
    key.failed = code == response->end() || !code->is_number() || code->get<double>() != 200;
  }
  return key;
}

Status WriteAll(int fd, std::string_view data, const std::string& path) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("cannot write", path);
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status Lock(int fd, const std::string& path) {
  while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) {
      return Status::FailedPrecondition(path + " is in use by another process (is another kvbatch writing it?)");
    }
    return Status::Ok();  // no lock support (some network filesystems): go on unprotected
  }
  return Status::Ok();
}

Status OpenFile(const std::string& path, int* fd, std::string* canonical) {
  *fd = open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (*fd < 0) return ErrnoStatus("cannot open", path);
  std::error_code ec;
  auto c = std::filesystem::canonical(path, ec);
  *canonical = ec ? path : c.string();
  return Status::Ok();
}

Status FileSize(int fd, const std::string& path, uint64_t* size) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return ErrnoStatus("cannot stat", path);
  *size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

}  // namespace

StatusOr<ResultLog> ResultLog::Open(const std::string& output_path, const std::string& error_path) {
  ResultLog log;
  Status s = OpenFile(output_path, &log.out_.fd, &log.out_.path);
  if (!s.ok()) return s;
  log.shared_ = true;
  if (!error_path.empty()) {
    s = OpenFile(error_path, &log.err_.fd, &log.err_.path);
    if (!s.ok()) return s;
    struct stat a {
    }, b{};
    if (fstat(log.out_.fd, &a) != 0) return ErrnoStatus("cannot stat", output_path);
    if (fstat(log.err_.fd, &b) != 0) return ErrnoStatus("cannot stat", error_path);
    if (a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
      close(std::exchange(log.err_.fd, -1));  // one file: one descriptor, one lock
    } else {
      log.shared_ = false;
    }
  }
  if (s = Lock(log.out_.fd, log.out_.path); !s.ok()) return s;
  if (!log.shared_) {
    if (s = Lock(log.err_.fd, log.err_.path); !s.ok()) return s;
  }
  if (s = log.Recover(log.out_); !s.ok()) return s;
  if (!log.shared_) {
    if (s = log.Recover(log.err_); !s.ok()) return s;
  }
  return log;
}

Status ResultLog::Recover(File& file) {
  struct Bad {
    int64_t line;
    uint64_t offset;
    const char* why;
  };
  std::optional<Bad> bad;
  int64_t line_no = 0;
  Status s = ForEachLine(file.fd, kMaxLineBytes, [&](const RawLine& raw) -> Status {
    ++line_no;
    if (bad) {
      // After a bad complete line only the torn tail of a write may follow.
      if (!raw.terminated) return Status::Ok();
      return Status::IoError(file.path + ": line " + std::to_string(bad->line) + " is " + bad->why +
                             " and is followed by more lines; this is not a file kvbatch wrote, so it is left as is");
    }
    std::optional<LineKey> key;
    if (raw.terminated && !raw.too_long) key = ReadKey(raw.text);
    if (!key) {
      bad = Bad{line_no, raw.offset,
                !raw.terminated ? "incomplete (no newline)"
                : raw.too_long  ? "too long"
                                : "not a JSON result line"};
      return Status::Ok();
    }
    if (answered_.insert(std::move(key->custom_id)).second && key->failed) ++failed_;
    return Status::Ok();
  });
  if (!s.ok()) return s;
  if (bad) {
    // The tail of an interrupted write: cut it so the next append starts on a
    // line boundary. Its request is not answered and will run again.
    if (ftruncate(file.fd, static_cast<off_t>(bad->offset)) != 0) return ErrnoStatus("cannot truncate", file.path);
    if (fdatasync(file.fd) != 0) return ErrnoStatus("cannot sync", file.path);
  }
  return FileSize(file.fd, file.path, &file.size);
}

Status ResultLog::AppendSuccess(std::string_view custom_id, std::string_view line) {
  return Append(out_, custom_id, line);
}

Status ResultLog::AppendFailure(std::string_view custom_id, std::string_view line) {
  Status s = Append(ErrorFile(), custom_id, line);
  if (s.ok()) ++failed_;
  return s;
}

Status ResultLog::Append(File& file, std::string_view custom_id, std::string_view line) {
  if (file.fd < 0) return Status::FailedPrecondition("ResultLog is not open");
  if (broken_) return Status::FailedPrecondition(file.path + " has a torn line that could not be removed");
  if (custom_id.empty()) return Status::InvalidArgument("empty custom_id");
  if (line.find('\n') != std::string_view::npos) return Status::InvalidArgument("a result line must not contain '\\n'");
  std::string key(custom_id);
  if (answered_.count(key) != 0) {
    return Status::FailedPrecondition("custom_id " + key + " is already answered; a line is never written twice");
  }
  std::string buf;
  buf.reserve(line.size() + 1);
  buf.append(line);
  buf += '\n';
  // One write(2) for the whole line: with O_APPEND a kill -9 leaves either
  // all of it or a tail that Recover cuts. Short writes (disk full) loop, and
  // on failure the partial bytes are cut here so later lines stay aligned.
  Status s = WriteAll(file.fd, buf, file.path);
  if (!s.ok()) {
    if (ftruncate(file.fd, static_cast<off_t>(file.size)) != 0) broken_ = true;
    return s;
  }
  file.size += buf.size();
  answered_.insert(std::move(key));
  return Status::Ok();
}

Status ResultLog::Sync() {
  if (out_.fd >= 0 && fdatasync(out_.fd) != 0) return ErrnoStatus("cannot sync", out_.path);
  if (!shared_ && err_.fd >= 0 && fdatasync(err_.fd) != 0) return ErrnoStatus("cannot sync", err_.path);
  return Status::Ok();
}

Status ResultLog::Finalize(const std::function<int64_t(std::string_view custom_id)>& line_of) {
  if (broken_) return Status::FailedPrecondition(out_.path + " has a torn line that could not be removed");
  Status s = Rewrite(out_, line_of);
  if (s.ok() && !shared_) s = Rewrite(err_, line_of);
  return s;
}

Status ResultLog::Rewrite(File& file, const std::function<int64_t(std::string_view)>& line_of) {
  if (file.fd < 0) return Status::FailedPrecondition("ResultLog is not open");
  constexpr int64_t kLast = std::numeric_limits<int64_t>::max();
  struct Entry {
    int64_t key;
    uint64_t offset;
    uint64_t length;  // without '\n'
  };
  std::vector<Entry> entries;
  bool sorted = true;
  Status s = ForEachLine(file.fd, kMaxLineBytes, [&](const RawLine& raw) -> Status {
    if (!raw.terminated || raw.too_long) return Status::IoError(file.path + ": unexpected torn or oversized line");
    auto key = ReadKey(raw.text);
    int64_t k = key ? line_of(key->custom_id) : kLast;
    if (k < 0) k = kLast;
    if (!entries.empty() && k < entries.back().key) sorted = false;
    entries.push_back(Entry{k, raw.offset, raw.length});
    return Status::Ok();
  });
  if (!s.ok() || sorted) return s;
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.key < b.key; });

  struct stat st {};
  if (fstat(file.fd, &st) != 0) return ErrnoStatus("cannot stat", file.path);
  // In input order into a new file that replaces the old one atomically
  // (util/atomic_file.h), with the old one's permissions.
  util::AtomicFileWriter out;
  if (s = out.Open(file.path, st.st_mode & 07777, kTempSuffix); !s.ok()) return s;
  std::string buf;
  for (const Entry& e : entries) {
    buf.resize(e.length);
    for (uint64_t got = 0; got < e.length;) {
      ssize_t n = pread(file.fd, buf.data() + got, e.length - got, static_cast<off_t>(e.offset + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ErrnoStatus("cannot read", file.path);
      if (n == 0) return Status::IoError(file.path + " shrank while being finalized");
      got += static_cast<uint64_t>(n);
    }
    if (s = out.AppendLine(buf); !s.ok()) return s;
  }
  if (s = out.Commit(); !s.ok()) return s;
  // Our descriptor still points at the replaced file: switch to the new one.
  int nfd = open(file.path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
  if (nfd < 0) return ErrnoStatus("cannot reopen", file.path);
  if (s = Lock(nfd, file.path); !s.ok()) {
    close(nfd);
    return s;
  }
  close(file.fd);
  file.fd = nfd;
  return FileSize(file.fd, file.path, &file.size);
}

ResultLog::ResultLog(ResultLog&& other) noexcept
    : out_(std::exchange(other.out_, File{})),
      err_(std::exchange(other.err_, File{})),
      shared_(other.shared_),
      broken_(other.broken_),
      answered_(std::move(other.answered_)),
      failed_(other.failed_) {}

ResultLog& ResultLog::operator=(ResultLog&& other) noexcept {
  if (this != &other) {
    CloseAll();
    out_ = std::exchange(other.out_, File{});
    err_ = std::exchange(other.err_, File{});
    shared_ = other.shared_;
    broken_ = other.broken_;
    answered_ = std::move(other.answered_);
    failed_ = other.failed_;
  }
  return *this;
}

ResultLog::~ResultLog() { CloseAll(); }

void ResultLog::CloseAll() {
  if (out_.fd >= 0) close(std::exchange(out_.fd, -1));
  if (err_.fd >= 0) close(std::exchange(err_.fd, -1));
}

}  // namespace kvb::batch
