// The batch lifecycle (DESIGN.md section 3) as one enum, with every allowed
// transition listed here and nowhere else:
//
//   validating -> failed | in_progress | cancelling
//   in_progress -> finalizing -> completed
//   in_progress -> cancelling -> cancelled
//   in_progress -> expired   (its unanswered requests fail with batch_expired)
//
// The store applies a transition as a compare-and-set (Store::TransitionBatch),
// so two nodes racing on the same batch cannot both move it.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace kvb::store {

enum class BatchStatus : uint8_t {
  kValidating,
  kFailed,
  kInProgress,
  kFinalizing,
  kCompleted,
  kExpired,
  kCancelling,
  kCancelled,
};

// The API's spelling ("in_progress", ...), also the stored text.
constexpr std::string_view ToString(BatchStatus s) {
  switch (s) {
    case BatchStatus::kValidating: return "validating";
    case BatchStatus::kFailed: return "failed";
    case BatchStatus::kInProgress: return "in_progress";
    case BatchStatus::kFinalizing: return "finalizing";
    case BatchStatus::kCompleted: return "completed";
    case BatchStatus::kExpired: return "expired";
    case BatchStatus::kCancelling: return "cancelling";
    case BatchStatus::kCancelled: return "cancelled";
  }
  return "failed";
}

constexpr std::optional<BatchStatus> ParseBatchStatus(std::string_view s) {
  for (auto v : {BatchStatus::kValidating, BatchStatus::kFailed, BatchStatus::kInProgress, BatchStatus::kFinalizing,
                 BatchStatus::kCompleted, BatchStatus::kExpired, BatchStatus::kCancelling, BatchStatus::kCancelled})
    if (ToString(v) == s) return v;
  return std::nullopt;
}

// No transition leaves a final status.
constexpr bool IsFinal(BatchStatus s) {
  return s == BatchStatus::kFailed || s == BatchStatus::kCompleted || s == BatchStatus::kExpired ||
         s == BatchStatus::kCancelled;
}

constexpr bool CanTransition(BatchStatus from, BatchStatus to) {
  switch (from) {
    case BatchStatus::kValidating:
      return to == BatchStatus::kFailed || to == BatchStatus::kInProgress || to == BatchStatus::kCancelling;
    case BatchStatus::kInProgress:
      return to == BatchStatus::kFinalizing || to == BatchStatus::kCancelling || to == BatchStatus::kExpired;
    case BatchStatus::kFinalizing: return to == BatchStatus::kCompleted;
    case BatchStatus::kCancelling: return to == BatchStatus::kCancelled;
    default: return false;
  }
}

// Statuses with work left for some node (validation, requests, files).
inline constexpr std::array<BatchStatus, 4> kUnfinishedStatuses = {
    BatchStatus::kValidating, BatchStatus::kInProgress, BatchStatus::kFinalizing, BatchStatus::kCancelling};

}  // namespace kvb::store
