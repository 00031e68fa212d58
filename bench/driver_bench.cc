// The coordination layer end to end, no model: N batch drivers (keeper +
// chunk runner, as N `kvbatch worker` processes would run them), each with
// a fake engine that answers at once and a Store object of its own, run one
// batch to completion on SQLite and on a private PostgreSQL server. The
// figure is results committed per second from in_progress to completed,
// with everything the real driver does per request (reading the line,
// in-flight marks before and after it runs, fenced group commits, renewals,
// finalization with the output file). bench/README.md has the figures.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "store/open_store.h"
#include "tests/support/fake_engine.h"
#include "tests/support/pg_server.h"
#include "worker/batch_driver.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace ks = kvb::store;

struct Args {
  int workers = 4;
  int rows = 20000;
  int chunk = 64;
  std::string stores = "sqlite,postgres";
};

struct Figures {
  double seconds = 0;
  int64_t committed = 0;
  std::vector<int64_t> per_worker;
};

bool Run(const Args& a, const std::string& uri, const std::string& dir, Figures* out) {
  std::vector<std::unique_ptr<ks::Store>> stores;
  for (int i = 0; i < a.workers + 1; ++i) {
    auto s = ks::OpenStore(uri, dir);
    if (!s.ok()) {
      std::fprintf(stderr, "driver_bench: %s\n", s.status().message().c_str());
      return false;
    }
    stores.push_back(std::move(s).value());
  }
  // The input: prefix groups of 100 requests.
  const std::string local = dir + "/input.jsonl";
  {
    FILE* f = std::fopen(local.c_str(), "wb");
    for (int i = 0; i < a.rows; ++i) {
      nlohmann::json line = {{"custom_id", "r" + std::to_string(i)},
                             {"method", "POST"},
                             {"url", "/v1/chat/completions"},
                             {"body",
                              {{"max_tokens", 8},
                               {"messages",
                                {{{"role", "system"}, {"content", "rubric " + std::to_string(i / 100)}},
                                 {{"role", "user"}, {"content", "candidate " + std::to_string(i)}}}}}}};
      const std::string text = line.dump() + "\n";
      std::fwrite(text.data(), 1, text.size(), f);
    }
    std::fclose(f);
  }
  ks::Store& admin = *stores.back();
  if (!admin.PutFile({"file-in", "in.jsonl", "batch", static_cast<int64_t>(std::filesystem::file_size(local)), 1, 0},
                     local)
           .ok())
    return false;
  ks::BatchRecord b;
  b.id = "batch_bench";
  b.endpoint = "/v1/chat/completions";
  b.input_file_id = "file-in";
  b.completion_window = "24h";
  b.created_at = 1;
  if (!admin.PutBatch(b).ok()) return false;
  kvb::worker::DriverOptions o;
  o.cache_dir = dir;
  o.chunk_rows = a.chunk;
  o.poll_interval = std::chrono::milliseconds(20);
  {
    const auto t = Clock::now();
    kvb::worker::BatchKeeper(&admin, o).Tick();  // validation, timed apart
    std::printf("  (validating %d rows took %.2f s)\n", a.rows, std::chrono::duration<double>(Clock::now() - t).count());
  }
  std::vector<std::unique_ptr<kvb::testing::FakeEngine>> engines;
  std::vector<std::unique_ptr<kvb::worker::BatchDriver>> drivers;
  for (int i = 0; i < a.workers; ++i) {
    engines.push_back(std::make_unique<kvb::testing::FakeEngine>());
    drivers.push_back(std::make_unique<kvb::worker::BatchDriver>(stores[i].get(), engines.back().get(), o));
  }
  const auto t0 = Clock::now();
  for (auto& d : drivers) d->Start();
  for (;;) {
    auto rec = admin.GetBatch(b.id);
    if (rec.ok() && rec->status == ks::BatchStatus::kCompleted) {
      out->committed = rec->counts.completed + rec->counts.failed;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  out->seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (auto& d : drivers) {
    d->Stop();
    out->per_worker.push_back(d->Stats()->results_committed);
  }
  drivers.clear();
  return out->committed == a.rows;
}

void Print(const char* name, const Args& a, const Figures& f) {
  std::printf("%-9s %8d %8lld %9.2f %11.0f   per worker:", name, a.workers, static_cast<long long>(f.committed),
              f.seconds, static_cast<double>(f.committed) / f.seconds);
  for (int64_t n : f.per_worker) std::printf(" %lld", static_cast<long long>(n));
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--workers") a.workers = std::atoi(v.c_str());
    else if (k == "--rows") a.rows = std::atoi(v.c_str());
    else if (k == "--chunk") a.chunk = std::atoi(v.c_str());
    else if (k == "--stores") a.stores = v;
    else {
      std::fprintf(stderr, "usage: kvbatch_driver_bench [--workers N] [--rows N] [--chunk N] [--stores sqlite,postgres]\n");
      return 2;
    }
  }
  std::printf("driver_bench: %d drivers with fake engines, one batch of %d rows, chunks of %d\n", a.workers, a.rows,
              a.chunk);
  std::vector<std::pair<std::string, Figures>> rows;
  if (a.stores.find("sqlite") != std::string::npos) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvb_driver_bench_XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) return 1;
    std::printf("sqlite (WAL file, synchronous=FULL)\n");
    Figures f;
    const bool ok = Run(a, tmpl + "/kvb.db", tmpl, &f);
    std::filesystem::remove_all(tmpl);
    if (!ok) return 1;
    rows.emplace_back("sqlite", f);
  }
  if (a.stores.find("postgres") != std::string::npos) {
    kvb::testing::PgTestServer pg;
    if (!pg.ok()) {
      std::fprintf(stderr, "driver_bench: %s\n", pg.error().c_str());
      return 1;
    }
    std::string err;
    if (!pg.CreateDatabase("kvb_driver_bench", &err)) {
      std::fprintf(stderr, "driver_bench: %s\n", err.c_str());
      return 1;
    }
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvb_driver_bench_XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) return 1;
    std::printf("postgres (private server, fsync on)\n");
    Figures f;
    const bool ok = Run(a, pg.UriFor("kvb_driver_bench"), tmpl, &f);
    std::filesystem::remove_all(tmpl);
    if (!ok) return 1;
    rows.emplace_back("postgres", f);
  }
  std::printf("\nstore      workers  results   seconds   results/s\n");
  for (const auto& [name, f] : rows) Print(name.c_str(), a, f);
  return 0;
}
