#include "batch/crash_guard.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_set>

namespace kvb::batch {

std::string CrashedMessage(int32_t crashes) {
  return "this request was running when the engine crashed " + std::to_string(crashes) +
         " times (the second time alone); it was not run again so that the rest of the batch could complete";
}

bool TestCrashOn(std::string_view custom_id) {
  static const char* target = std::getenv("KVBATCH_TEST_CRASH_ON");
  return target != nullptr && *target != '\0' && custom_id == target;
}

namespace {

Status Errno(const std::string& what, const std::string& path) {
  return Status::IoError(what + " " + path + ": " + std::strerror(errno));
}

Status WriteAll(int fd, const std::string& text, const std::string& path) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot write", path);
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

StatusOr<CrashJournal> CrashJournal::Open(const std::string& path, const std::vector<int64_t>& answered_lines) {
  std::unordered_map<int64_t, int32_t> counts;
  {
    std::ifstream in(path);
    std::unordered_set<int64_t> session;
    bool open_session = false;
    auto close_session = [&](bool crashed) {
      if (crashed)
        for (int64_t l : session) ++counts[l];
      session.clear();
    };
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream ls(line);
      std::string kind;
      ls >> kind;
      if (kind == "s") {
        close_session(open_session);
        open_session = true;
      } else if (kind == "e") {
        close_session(false);
        open_session = false;
      } else if (kind == "+") {
        int64_t l = 0;
        if (ls >> l) session.insert(l);
      } else if (kind == "-") {
        int64_t l = 0;
        if (ls >> l) session.erase(l);
      } else if (kind == "c") {
        int64_t l = 0;
        int32_t n = 0;
        if (ls >> l >> n && n > 0) counts[l] += n;
      }
      // Anything else (a line torn by the crash) is skipped.
    }
    close_session(open_session);
  }
  for (int64_t l : answered_lines) counts.erase(l);

  // Rewrite compactly (temp file, rename), then append the new session.
  const std::string tmp = path + ".tmp";
  std::string text;
  for (const auto& [l, n] : counts) text += "c " + std::to_string(l) + " " + std::to_string(n) + "\n";
  text += "s\n";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  if (Status st = WriteAll(fd, text, tmp); !st.ok()) {
    ::close(fd);
    return st;
  }
  if (::fsync(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    ::close(fd);
    return Errno("cannot write", path);
  }
  ::close(fd);
  fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  CrashJournal j(path, fd);
  j.crashes_ = std::move(counts);
  return j;
}

CrashJournal::CrashJournal(CrashJournal&& other) noexcept
    : path_(std::move(other.path_)), fd_(other.fd_), crashes_(std::move(other.crashes_)) {
  other.fd_ = -1;
}

CrashJournal::~CrashJournal() {
  if (fd_ >= 0) ::close(fd_);
}

Status CrashJournal::Append(const std::string& text) {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ < 0) return Status::FailedPrecondition("the crash journal is closed");
  return WriteAll(fd_, text, path_);
}

Status CrashJournal::MarkInFlight(const std::vector<int64_t>& lines) {
  if (lines.empty()) return Status::Ok();
  std::string text;
  for (int64_t l : lines) text += "+ " + std::to_string(l) + "\n";
  return Append(text);
}

Status CrashJournal::MarkDone(int64_t line) { return Append("- " + std::to_string(line) + "\n"); }

Status CrashJournal::EndSession() { return Append("e\n"); }

Status CrashJournal::Remove() {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (::unlink(path_.c_str()) != 0 && errno != ENOENT) return Errno("cannot remove", path_);
  return Status::Ok();
}

}  // namespace kvb::batch
