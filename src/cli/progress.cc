#include "cli/progress.h"

#include <unistd.h>

#include <cmath>

namespace kvb::cli {

std::string HumanCount(double v) {
  char buf[32];
  if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.1fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

std::string HumanDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  long t = std::lround(s);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

Progress::Progress(FILE* out, bool quiet, double interval_s)
    : out_(out), quiet_(quiet), tty_(isatty(fileno(out)) != 0), interval_(tty_ ? 0.25 : interval_s),
      start_(std::chrono::steady_clock::now()), last_(start_) {}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::Line(const ProgressSnapshot& s, double elapsed_s, int bar_width) {
  const auto& e = s.engine;
  const double frac = s.total > 0 ? static_cast<double>(s.done) / static_cast<double>(s.total) : 1.0;
  const double rps = elapsed_s > 0 ? static_cast<double>(s.done) / elapsed_s : 0;
  const double tps = elapsed_s > 0 ? static_cast<double>(e.prefill_tokens + e.completion_tokens) / elapsed_s : 0;
  const double eta = rps > 0 ? static_cast<double>(s.total - s.done) / rps : NAN;
  const double hit = e.prompt_tokens > 0 ? 100.0 * static_cast<double>(e.cached_tokens) / static_cast<double>(e.prompt_tokens) : 0;
  std::string line = std::to_string(s.done) + "/" + std::to_string(s.total);
  if (bar_width > 0) {
    int filled = static_cast<int>(frac * bar_width);
    line += " [" + std::string(filled, '=') + (filled < bar_width ? ">" : "") +
            std::string(std::max(0, bar_width - filled - 1), ' ') + "]";
  }
  char buf[256];
  std::snprintf(buf, sizeof buf, " %3.0f%% | %.1f req/s | %s tok/s | ETA %s | cache hit %.0f%% | KV %s/%s cells (%s reserved) | %d running",
                100 * frac, rps, HumanCount(tps).c_str(), HumanDuration(eta).c_str(), hit,
                HumanCount(e.cells_used).c_str(), HumanCount(e.cells_total).c_str(),
                HumanCount(e.cells_reserved).c_str(), e.active);
  line += buf;
  if (s.resumed > 0) line += " | resumed " + std::to_string(s.resumed);
  return line;
}

void Progress::Update(const ProgressSnapshot& s, bool force) {
  if (quiet_) return;
  auto now = std::chrono::steady_clock::now();
  if (!force && std::chrono::duration<double>(now - last_).count() < interval_) return;
  last_ = now;
  if (tty_) {
    std::fprintf(out_, "\r\033[K%s", Line(s, elapsed(), 24).c_str());
    drawn_ = true;
  } else {
    std::fprintf(out_, "progress: %s\n", Line(s, elapsed(), 0).c_str());
  }
  std::fflush(out_);
}

void Progress::Finish() {
  if (drawn_ && !quiet_) std::fputc('\n', out_);
  drawn_ = false;
}

}  // namespace kvb::cli
