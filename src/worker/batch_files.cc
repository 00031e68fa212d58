#include "worker/batch_files.h"

#include <algorithm>
#include <filesystem>
#include <unordered_map>

#include "batch/input_file.h"
#include "batch/prefix_order.h"
#include "batch/response.h"
#include "util/atomic_file.h"

namespace kvb::worker {

Validation ValidateBatchInput(const store::BatchRecord& rec, const StatusOr<std::string>& input_path,
                              size_t max_listed_errors, int32_t chunk_rows) {
  Validation v;
  auto endpoint = batch::EndpointFromPath(rec.endpoint);
  if (!input_path.ok()) {
    v.errors.push_back({"invalid_input_file",
                        input_path.status().code() == StatusCode::kNotFound
                            ? "The input file " + rec.input_file_id + " no longer exists."
                            : "The input file " + rec.input_file_id + " cannot be read: " +
                                  input_path.status().message(),
                        "input_file_id", 0});
    return v;
  }
  if (!endpoint) {
    v.errors.push_back({"invalid_endpoint", "Unsupported endpoint " + rec.endpoint + ".", "endpoint", 0});
    return v;
  }
  auto scan = batch::ScanInputFile(*input_path);
  if (!scan.ok()) {
    v.errors.push_back({"invalid_input_file", scan.status().message(), "input_file_id", 0});
    return v;
  }
  size_t dropped = 0;
  auto add = [&](store::BatchError e) {
    if (v.errors.size() < max_listed_errors) {
      v.errors.push_back(std::move(e));
    } else {
      ++dropped;
    }
  };
  for (const batch::LineError& e : scan->errors) add({e.code, e.message, e.param, e.line});
  v.rows.reserve(scan->valid.size());
  for (const batch::InputLine& l : scan->valid) {
    if (l.endpoint != *endpoint) {
      add({"mismatched_endpoint",
           "Line " + std::to_string(l.line_no) + ": the url " + std::string(batch::EndpointPath(l.endpoint)) +
               " does not match the batch's endpoint " + rec.endpoint + ".",
           "url", l.line_no});
    }
    store::PendingRequest p;
    p.line = l.line_no;
    p.custom_id = l.custom_id;
    p.offset = static_cast<int64_t>(l.offset);
    p.length = static_cast<int64_t>(l.length);
    p.prefix_hash = l.prefix_hash;
    v.rows.push_back(std::move(p));
  }
  if (scan->total_lines == 0) v.errors.push_back({"empty_file", "The input file has no requests.", "", 0});
  if (dropped > 0)
    v.errors.push_back({"too_many_errors", std::to_string(dropped) + " more errors are not listed.", "", 0});
  if (!v.errors.empty()) {
    v.rows.clear();
    return v;
  }
  AssignChunks(v.rows, chunk_rows);
  return v;
}

void AssignChunks(std::vector<store::PendingRequest>& rows, int32_t chunk_rows) {
  if (chunk_rows < 1) chunk_rows = 1;
  batch::GroupBySharedPrefix(rows, [](const store::PendingRequest& p) { return p.prefix_hash; });
  std::unordered_map<uint64_t, int64_t> group_size;
  for (const auto& r : rows) ++group_size[r.prefix_hash];
  // A group of at least a quarter chunk starts a chunk of its own; smaller
  // ones fill up the chunk they come to (there is little prefix to share).
  const int64_t small = std::max(1, chunk_rows / 4);
  int64_t chunk = 0;
  int32_t in_chunk = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const bool new_group = i > 0 && rows[i].prefix_hash != rows[i - 1].prefix_hash;
    const bool own_chunk = new_group && group_size[rows[i].prefix_hash] >= small && in_chunk > 0;
    if (in_chunk == chunk_rows || own_chunk) {
      ++chunk;
      in_chunk = 0;
    }
    rows[i].chunk = chunk;
    ++in_chunk;
  }
}

StatusOr<ResultFiles> WriteResultFiles(store::Store* store, const store::BatchRecord& rec, const std::string& dir,
                                       int64_t now) {
  struct Out {
    store::FileRecord record;
    util::AtomicFileWriter w;
    bool open = false;
  };
  Out outs[2];
  const char* names[2] = {"_output.jsonl", "_error.jsonl"};
  Status st = store->ForEachRequest(rec.id, [&](const store::StoredRequest& r) -> Status {
    if (r.state == store::RequestState::kPending)
      return Status::Internal("request on line " + std::to_string(r.line) + " is still pending");
    const int k = r.state == store::RequestState::kCompleted ? 0 : 1;
    Out& o = outs[k];
    if (!o.open) {
      o.record.id = batch::NewId("file-");
      o.record.filename = rec.id + names[k];
      o.record.purpose = "batch_output";
      o.record.created_at = now;
      if (Status s = o.w.Open(dir + "/" + o.record.id + ".result"); !s.ok()) return s;
      o.open = true;
    }
    return o.w.AppendLine(r.result_line);
  });
  if (!st.ok()) return st;  // the writers remove their temporary files
  ResultFiles files;
  for (int k = 0; k < 2; ++k) {
    Out& o = outs[k];
    if (!o.open) continue;
    o.record.bytes = o.w.bytes();
    auto path = o.w.Release();
    if (!path.ok()) {
      DiscardResultFiles(files);
      return path.status();
    }
    (k == 0 ? files.output : files.error) = store::ResultFile{o.record, *path};
  }
  return files;
}

void DiscardResultFiles(const ResultFiles& files) {
  std::error_code ec;
  if (files.output) std::filesystem::remove(files.output->local_path, ec);
  if (files.error) std::filesystem::remove(files.error->local_path, ec);
}

}  // namespace kvb::worker
