#include "batch/input_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <utility>

namespace kvb::batch {

namespace {

constexpr size_t kChunkBytes = 4 << 20;

std::string Errno(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

bool IsBlank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

}  // namespace

Status ForEachLine(int fd, uint64_t max_line_bytes, const std::function<Status(const RawLine&)>& fn) {
  std::vector<char> chunk(kChunkBytes);
  std::string partial;      // bytes of the current line read in earlier chunks
  bool skipping = false;    // current line is too long: its bytes are counted, not kept
  uint64_t line_start = 0;  // file offset of the current line
  uint64_t line_len = 0;    // bytes of the current line so far
  uint64_t pos = 0;         // file offset of chunk[0]
  for (;;) {
    ssize_t n = pread(fd, chunk.data(), chunk.size(), static_cast<off_t>(pos));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::IoError(std::string("read failed: ") + std::strerror(errno));
    }
    if (n == 0) break;
    size_t i = 0;
    const size_t end = static_cast<size_t>(n);
    while (i < end) {
      const char* nl = static_cast<const char*>(std::memchr(chunk.data() + i, '\n', end - i));
      size_t j = nl ? static_cast<size_t>(nl - chunk.data()) : end;
      std::string_view seg(chunk.data() + i, j - i);
      line_len += seg.size();
      if (!skipping && line_len > max_line_bytes) {
        skipping = true;
        std::string().swap(partial);
      }
      if (nl == nullptr) {
        if (!skipping) partial.append(seg);
        break;
      }
      RawLine line;
      line.offset = line_start;
      line.length = line_len;
      line.terminated = true;
      line.too_long = skipping;
      if (!skipping) {
        // Whole line inside this chunk: hand out a view, no copy.
        if (partial.empty()) {
          line.text = seg;
        } else {
          partial.append(seg);
          line.text = partial;
        }
      }
      Status s = fn(line);
      if (!s.ok()) return s;
      partial.clear();
      skipping = false;
      line_start = pos + j + 1;
      line_len = 0;
      i = j + 1;
    }
    pos += end;
  }
  if (line_len > 0) {
    RawLine line;
    line.offset = line_start;
    line.length = line_len;
    line.terminated = false;
    line.too_long = skipping;
    if (!skipping) line.text = partial;
    return fn(line);
  }
  return Status::Ok();
}

StatusOr<InputScan> ScanInputFile(const std::string& path, uint64_t max_line_bytes) {
  max_line_bytes = std::min<uint64_t>(max_line_bytes, std::numeric_limits<uint32_t>::max());
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return errno == ENOENT ? Status::NotFound("input file not found: " + path)
                           : Status::IoError(Errno("cannot open", path));
  }
  InputScan scan;
  std::unordered_map<std::string, int64_t> first_line;  // custom_id -> first line using it
  int64_t line_no = 0;
  Status st = ForEachLine(fd, max_line_bytes, [&](const RawLine& raw) -> Status {
    ++line_no;
    if (raw.too_long) {
      ++scan.total_lines;
      scan.errors.push_back(LineError{
          line_no, kLineTooLong,
          "line is " + std::to_string(raw.length) + " bytes, over the limit of " + std::to_string(max_line_bytes), "",
          ""});
      return Status::Ok();
    }
    std::string_view text = raw.text;
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    if (IsBlank(text)) return Status::Ok();
    ++scan.total_lines;

    auto result = ValidateLine(text, line_no);
    const std::string& id = std::holds_alternative<LineInfo>(result) ? std::get<LineInfo>(result).custom_id
                                                                     : std::get<LineError>(result).custom_id;
    if (!id.empty()) {
      auto [it, inserted] = first_line.try_emplace(id, line_no);
      if (!inserted) {
        scan.errors.push_back(
            LineError{line_no, kDuplicateCustomId,
                      "custom_id is already used on line " + std::to_string(it->second) + "; custom_ids must be unique",
                      "custom_id", id});
        return Status::Ok();
      }
    }
    if (auto* info = std::get_if<LineInfo>(&result)) {
      scan.valid.push_back(InputLine{line_no, raw.offset, static_cast<uint32_t>(text.size()),
                                     std::move(info->custom_id), info->endpoint, info->prefix_hash});
    } else {
      scan.errors.push_back(std::move(std::get<LineError>(result)));
    }
    return Status::Ok();
  });
  close(fd);
  if (!st.ok()) return Status(st.code(), path + ": " + st.message());
  return scan;
}

StatusOr<InputReader> InputReader::Open(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return errno == ENOENT ? Status::NotFound("input file not found: " + path)
                           : Status::IoError(Errno("cannot open", path));
  }
  return InputReader(fd);
}

InputReader::InputReader(InputReader&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

InputReader& InputReader::operator=(InputReader&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

InputReader::~InputReader() {
  if (fd_ >= 0) close(fd_);
}

StatusOr<std::string> InputReader::ReadLine(const InputLine& line) const {
  if (fd_ < 0) return Status::FailedPrecondition("InputReader is not open");
  std::string out(line.length, '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = pread(fd_, out.data() + got, out.size() - got, static_cast<off_t>(line.offset + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::IoError("reading line " + std::to_string(line.line_no) + ": " + std::strerror(errno));
    }
    if (n == 0) {
      return Status::IoError("input file is shorter than at scan time (line " + std::to_string(line.line_no) +
                             "); was it changed?");
    }
    got += static_cast<size_t>(n);
  }
  return out;
}

}  // namespace kvb::batch
