// The batch driver's file work, free of threads and engines: validating an
// input file into request rows grouped into chunks, and writing a finished
// batch's output and error files. Any node may do either (under the batch's
// task lease), so both read and write through the store only.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "store/store.h"

namespace kvb::worker {

struct Validation {
  std::vector<store::PendingRequest> rows;  // with their chunks; empty when errors
  std::vector<store::BatchError> errors;    // non-empty: the batch fails
};

// Scans the batch's input (a local path holding its content), checks every
// line against the batch's endpoint, and groups the rows into chunks.
// `input_error` (non-empty) reports that the content could not be had.
Validation ValidateBatchInput(const store::BatchRecord& rec, const StatusOr<std::string>& input_path,
                              size_t max_listed_errors, int32_t chunk_rows);

// Chunks for claiming: rows sharing a prefix (prefix_hash) are put together,
// in their group's order of first appearance, cut into chunks of at most
// `chunk_rows`. A group of at least a quarter chunk starts a chunk of its
// own; smaller groups fill up the chunk they come to, so a file of
// all-different prompts becomes full chunks, not one chunk per row. Sets
// each row's `chunk` (0, 1, ... in that order).
void AssignChunks(std::vector<store::PendingRequest>& rows, int32_t chunk_rows);

struct ResultFiles {
  std::optional<store::ResultFile> output;  // absent: no line answered with 2xx
  std::optional<store::ResultFile> error;   // absent: no failed line
};

// Writes the output file (answered with 2xx) and the error file (everything
// else) in input order under `dir`, each custom_id exactly once across the
// two; a file with no lines is not created (its id stays null, as with
// OpenAI). Internal error when a row is still pending.
StatusOr<ResultFiles> WriteResultFiles(store::Store* store, const store::BatchRecord& rec, const std::string& dir,
                                       int64_t now);

// Removes the local files of `files` (after FinalizeBatch refused them).
void DiscardResultFiles(const ResultFiles& files);

}  // namespace kvb::worker
