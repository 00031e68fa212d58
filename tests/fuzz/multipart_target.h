// fuzz_multipart: the upload path end to end, without sockets. kvbatch's
// file routes (api::AddFileRoutes: CreateFile's streaming multipart reader
// into a temporary file, then the store) are registered on an
// httplib::Server, and the fuzz input is fed to httplib's request
// processing (the protected Server::process_request, as cpp-httplib's own
// fuzzer does) through an in-memory Stream.
//
// The input is the multipart body of `POST /v1/files` with a fixed boundary
// (kBoundary), sent with a Content-Length; an input that starts with an
// HTTP method ("POST ", "GET ", "DELETE ") is sent as the whole raw request
// instead (headers, chunked bodies, other file routes).
//
// Invariants: nothing crashes; no 500 (a handler exception or a storage
// failure on a healthy disk); a stored file has the size its record says;
// no temporary upload file is left behind.
//
// Note: cpp-httplib is Debian's compiled library (not instrumented), so the
// fuzzer's coverage feedback comes from kvbatch's handler and the store.
#pragma once

#include <dlfcn.h>
#include <signal.h>
#include <httplib.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "api/routes.h"
#include "api/server.h"
#include "fuzz_check.h"
#include "store/sqlite_store.h"

namespace kvb::fuzz {

inline constexpr char kBoundary[] = "kvbfuzzBoundary7MA4YWxkTrZu0gW";

// An in-memory connection: reads the request, collects the response.
class MemoryStream : public httplib::Stream {
 public:
  explicit MemoryStream(std::string in) : in_(std::move(in)) {}
  bool is_readable() const override { return true; }
  bool is_writable() const override { return true; }
  ssize_t read(char* ptr, size_t size) override {
    size = std::min(size, in_.size() - pos_);
    std::memcpy(ptr, in_.data() + pos_, size);
    pos_ += size;
    return static_cast<ssize_t>(size);
  }
  ssize_t write(const char* ptr, size_t size) override {
    out_.append(ptr, size);
    return static_cast<ssize_t>(size);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override { ip = "127.0.0.1", port = 40000; }
  void get_local_ip_and_port(std::string& ip, int& port) const override { ip = "127.0.0.1", port = 4080; }
  socket_t socket() const override { return 0; }
  const std::string& out() const { return out_; }

 private:
  std::string in_;
  size_t pos_ = 0;
  std::string out_;
};

// Which library the process binds cpp-httplib's internal functions to.
// libllama-common exports its own vendored cpp-httplib (another version)
// under the same names: when it comes before Debian's libcpp-httplib in the
// executable's link order, libcpp-httplib's calls land in the other
// version's code and crash at the first request.
inline std::string HttplibProvider() {
  void* sym = ::dlsym(RTLD_DEFAULT, "_ZN7httplib6detail18stream_line_reader7getlineEv");
  Dl_info info{};
  if (sym == nullptr || ::dladdr(sym, &info) == 0 || info.dli_fname == nullptr) return "(not found)";
  return info.dli_fname;
}

class UploadHarness : public httplib::Server {
 public:
  UploadHarness() {
    // One folder per process, named by pid: libFuzzer often ends a process
    // without running destructors, so folders of processes that are gone
    // are removed here.
    const std::string base =
        std::filesystem::is_directory("/dev/shm") && ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    const std::string prefix = "kvb-fuzz-multipart-";
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(base, ec)) {
      const std::string name = e.path().filename().string();
      if (!name.starts_with(prefix)) continue;
      const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
      if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) std::filesystem::remove_all(e.path(), ec);
    }
    dir_ = base + "/" + prefix + std::to_string(::getpid());
    std::filesystem::create_directories(dir_, ec);
    if (ec) std::abort();
    auto st = store::SqliteStore::Open(":memory:", dir_);
    if (!st.ok()) std::abort();
    store_ = std::move(st).value();
    ctx_.store = store_.get();
    ctx_.options.files_dir = dir_;
    ctx_.options.max_file_bytes = 4096;  // small, so the 413 path is reachable
    set_payload_max_length(static_cast<size_t>(ctx_.options.max_file_bytes) + (size_t{1} << 20));
    set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      res.status = 500;
      exception_ = "(not a std::exception)";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        exception_ = e.what();
      } catch (...) {
      }
    });
    api::AddFileRoutes(*this, ctx_);
  }
  ~UploadHarness() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void One(const uint8_t* data, size_t size) {
    static const std::string provider = HttplibProvider();
    KVB_FUZZ_CHECK(provider.find("libcpp-httplib") != std::string::npos,
                   "cpp-httplib's functions bind to " + provider +
                       ", not Debian's libcpp-httplib: link it before libllama-common");
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    std::string request;
    if (input.starts_with("POST ") || input.starts_with("GET ") || input.starts_with("DELETE ")) {
      request = input;
    } else {
      request = "POST /v1/files HTTP/1.1\r\nHost: fuzz\r\nContent-Type: multipart/form-data; boundary=";
      request += kBoundary;
      request += "\r\nContent-Length: " + std::to_string(size) + "\r\n\r\n";
      request += input;
    }
    exception_.clear();
    MemoryStream stream(std::move(request));
    bool closed = false;
    process_request(stream, /*close_connection=*/true, closed, nullptr);

    const std::string& out = stream.out();
    static const bool verbose = std::getenv("KVB_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "fuzz_multipart: %s\n", Show(out.substr(0, 300), 300).c_str());
    KVB_FUZZ_CHECK(exception_.empty(), "a route handler threw: " + Show(exception_, 300));
    KVB_FUZZ_CHECK(!out.starts_with("HTTP/1.1 500"), "a 500 answer: " + Show(out, 400));
    // Every stored file is complete; nothing half-written stays behind.
    auto files = store_->ListFiles("", "", 1000, true);
    KVB_FUZZ_CHECK(files.ok(), "ListFiles failed");
    for (const auto& f : *files) {
      std::error_code ec;
      auto path = store_->LocalFile(f.id, dir_);
      KVB_FUZZ_CHECK(path.ok(), "no content for stored file " + f.id);
      const auto bytes = std::filesystem::file_size(*path, ec);
      KVB_FUZZ_CHECK(!ec && static_cast<int64_t>(bytes) == f.bytes,
                     "stored file " + f.id + " has " + std::to_string(bytes) + " bytes, its record " +
                         std::to_string(f.bytes));
      KVB_FUZZ_CHECK(f.bytes <= ctx_.options.max_file_bytes, "a file over the upload limit was stored");
      KVB_FUZZ_CHECK(f.purpose == "batch", "a file stored with purpose " + Show(f.purpose));
      KVB_FUZZ_CHECK(IsValidUtf8(f.filename), "a stored filename is not UTF-8: " + Show(f.filename));
      (void)store_->DeleteFile(f.id);
    }
    for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
      const std::string name = entry.path().filename().string();
      KVB_FUZZ_CHECK(!name.ends_with(".upload") && !name.ends_with(".tmp"),
                     "a temporary upload file was left behind: " + name);
      std::filesystem::remove(entry.path());
    }
  }

 private:
  std::string dir_;
  std::unique_ptr<store::SqliteStore> store_;
  api::Context ctx_;
  std::string exception_;  // what the last request's handler threw
};

inline void FuzzMultipart(const uint8_t* data, size_t size) {
  static UploadHarness harness;
  harness.One(data, size);
}

}  // namespace kvb::fuzz
