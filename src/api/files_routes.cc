// Files API: upload (multipart, streamed to a local temporary file, then
// handed to the store, which keeps the content where every node can read
// it), list, retrieve, content (streamed from the store), delete.
// Clients name files only by id: no client string ever reaches a path.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>

#include "api/objects.h"
#include "api/routes.h"
#include "batch/response.h"
#include "util/atomic_file.h"

namespace kvb::api {

using nlohmann::json;

namespace {

constexpr size_t kMaxFieldBytes = 4096;  // non-file form fields (purpose)

// The upload's bytes go straight to a temporary file (removed unless the
// upload completes), so a broken upload never leaves a file behind.
struct Upload {
  util::AtomicFileWriter file;
  std::string field;
  std::string filename;
  std::string purpose;
  int64_t bytes = 0;
  bool got_file = false;
  bool too_large = false;
  bool io_error = false;
};

void CreateFile(Context& ctx, const httplib::Request& req, httplib::Response& res,
                const httplib::ContentReader& reader) {
  if (!req.is_multipart_form_data()) {
    SendError(res, 400, "Uploads must be multipart/form-data with a 'file' and a 'purpose' field.", "invalid_request");
    return;
  }
  const std::string id = batch::NewId("file-");
  auto up = std::make_unique<Upload>();
  const int64_t limit = ctx.options.max_file_bytes;
  const bool read_ok = reader(
      [&](const httplib::MultipartFormData& part) {
        up->field = part.name;
        if (part.name == "file") {
          if (up->got_file) return true;  // a second file part is ignored
          up->got_file = true;
          up->filename = part.filename.empty() ? "upload.jsonl" : part.filename;
          if (!up->file.Open(ctx.options.files_dir + "/" + id + ".upload").ok()) up->io_error = true;
        }
        return true;
      },
      [&](const char* data, size_t len) {
        if (up->field == "purpose") {
          if (up->purpose.size() + len <= kMaxFieldBytes) up->purpose.append(data, len);
        } else if (up->field == "file" && !up->too_large && !up->io_error) {
          up->bytes += static_cast<int64_t>(len);
          if (up->bytes > limit) {
            // Keep reading (and dropping) the rest, so the client gets the 413.
            up->too_large = true;
          } else if (!up->file.Append(std::string_view(data, len)).ok()) {
            up->io_error = true;
          }
        }
        return true;
      });
  if (up->too_large) {
    SendError(res, 413,
              "The file is larger than this server's limit of " + std::to_string(limit) +
                  " bytes (kvbatch serve --max-file-bytes).",
              "file_too_large", "file");
    return;
  }
  if (!read_ok) {
    SendError(res, 400, "The upload could not be read completely.", "invalid_request");
    return;
  }
  if (up->io_error) {
    SendError(res, 500, "The server could not store the file.", "server_error");
    return;
  }
  if (!up->got_file) {
    SendError(res, 400, "Missing the 'file' field.", "invalid_request", "file");
    return;
  }
  if (up->purpose.empty()) {
    SendError(res, 400, "Missing the 'purpose' field.", "invalid_request", "purpose");
    return;
  }
  if (up->purpose != "batch") {
    SendError(res, 400,
              "Invalid value for 'purpose': '" + batch::ToValidUtf8(up->purpose) +
                  "'. This server accepts files with purpose 'batch'.",
              "invalid_value", "purpose");
    return;
  }
  auto local = up->file.Release();
  if (!local.ok()) {
    SendError(res, 500, "The server could not store the file.", "server_error");
    return;
  }
  store::FileRecord f;
  f.id = id;
  f.filename = batch::ToValidUtf8(up->filename);
  f.purpose = up->purpose;
  f.bytes = up->bytes;
  f.created_at = static_cast<int64_t>(std::time(nullptr));
  if (Status st = ctx.store->PutFile(f, *local); !st.ok()) {
    std::error_code ec;
    std::filesystem::remove(*local, ec);
    SendStatus(res, st);
    return;
  }
  SendJson(res, 200, FileObject(f));
}

}  // namespace

void AddFileRoutes(httplib::Server& http, Context& ctx) {
  http.Post("/v1/files", [&ctx](const httplib::Request& req, httplib::Response& res,
                                const httplib::ContentReader& reader) { CreateFile(ctx, req, res, reader); });

  http.Get("/v1/files", [&ctx](const httplib::Request& req, httplib::Response& res) {
    int limit = 0;
    if (!LimitParam(req, res, 10000, 10000, &limit)) return;
    const std::string order = req.has_param("order") ? req.get_param_value("order") : "desc";
    if (order != "asc" && order != "desc") {
      SendError(res, 400, "Invalid 'order': expected 'asc' or 'desc'.", "invalid_value", "order");
      return;
    }
    const std::string after = req.get_param_value("after");
    if (!after.empty() && !ctx.store->GetFile(after).ok())
      return SendError(res, 400, "Invalid 'after': no file has the id '" + batch::ToValidUtf8(after.substr(0, 80)) + "'.",
                       "invalid_value", "after");
    auto files = ctx.store->ListFiles(req.get_param_value("purpose"), after, limit + 1,
                                      order == "asc");
    if (!files.ok()) return SendStatus(res, files.status());
    const bool more = static_cast<int>(files->size()) > limit;
    if (more) files->resize(static_cast<size_t>(limit));
    json data = json::array();
    for (const auto& f : *files) data.push_back(FileObject(f));
    SendJson(res, 200, ListObject(std::move(data), more));
  });

  http.Get(R"(/v1/files/([^/]+))", [&ctx](const httplib::Request& req, httplib::Response& res) {
    auto f = ctx.store->GetFile(req.matches[1].str());
    if (!f.ok()) return SendError(res, 404, "No such File object: " + req.matches[1].str(), "not_found", "id");
    SendJson(res, 200, FileObject(*f));
  });

  http.Get(R"(/v1/files/([^/]+)/content)", [&ctx](const httplib::Request& req, httplib::Response& res) {
    auto f = ctx.store->GetFile(req.matches[1].str());
    if (!f.ok()) return SendError(res, 404, "No such File object: " + req.matches[1].str(), "not_found", "id");
    // Streamed in pieces from the store (a local file, or database rows).
    res.set_content_provider(
        static_cast<size_t>(f->bytes), "application/octet-stream",
        [&ctx, id = f->id](size_t offset, size_t length, httplib::DataSink& sink) {
          std::string buf;
          Status st = ctx.store->ReadFile(id, static_cast<int64_t>(offset),
                                          static_cast<int64_t>(std::min<size_t>(length, 1 << 20)), &buf);
          if (!st.ok() || buf.empty()) return false;
          return sink.write(buf.data(), buf.size());
        });
  });

  http.Delete(R"(/v1/files/([^/]+))", [&ctx](const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1].str();
    auto f = ctx.store->GetFile(id);
    if (!f.ok()) return SendError(res, 404, "No such File object: " + id, "not_found", "id");
    // The input of an unfinished batch stays until the batch is done: its
    // requests are read from it, also after a restart.
    auto busy = ctx.store->BatchesWithStatus({store::kUnfinishedStatuses.begin(), store::kUnfinishedStatuses.end()});
    if (!busy.ok()) return SendStatus(res, busy.status());
    for (const auto& b : *busy) {
      if (b.input_file_id == id)
        return SendError(res, 409, "The file is the input of batch " + b.id + ", which has not finished.",
                         "file_in_use", "id");
    }
    if (Status st = ctx.store->DeleteFile(id); !st.ok()) return SendStatus(res, st);
    SendJson(res, 200, {{"id", id}, {"object", "file"}, {"deleted", true}});
  });
}

}  // namespace kvb::api
