// Coordination benchmark of the stores (bench/README.md): N workers, each
// with a Store object of its own (its own connections, as separate worker
// processes would have), claim chunks of one batch and commit their rows in
// fenced group commits with fake result lines, until the batch is answered.
// Prints results committed per second for SQLite (a WAL file) and
// PostgreSQL (a private server started by scripts/pg_test_server.sh, or
// --pg URI), side by side. No model, no engine: only the store's cost.
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "store/pg_store.h"
#include "store/sqlite_store.h"
#include "tests/support/pg_server.h"

namespace {

using kvb::Status;
using kvb::StatusOr;
namespace ks = kvb::store;

struct Options {
  int workers = 4;
  int rows = 50'000;
  int chunk = 64;
  int group = 16;          // outcomes per commit
  int result_bytes = 300;  // length of each fake result line
  std::string stores = "sqlite,postgres";
  std::string pg_uri;  // empty: a private server
};

void Usage() {
  std::fprintf(stderr,
               "usage: kvbatch_store_bench [--workers N] [--rows N] [--chunk N] [--group N] [--result-bytes N]\n"
               "                           [--stores sqlite,postgres] [--pg postgresql://...]\n");
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) Usage();
    const char* v = argv[++i];
    if (a == "--workers") o.workers = std::atoi(v);
    else if (a == "--rows") o.rows = std::atoi(v);
    else if (a == "--chunk") o.chunk = std::atoi(v);
    else if (a == "--group") o.group = std::atoi(v);
    else if (a == "--result-bytes") o.result_bytes = std::atoi(v);
    else if (a == "--stores") o.stores = v;
    else if (a == "--pg") o.pg_uri = v;
    else Usage();
  }
  if (o.workers < 1 || o.rows < 1 || o.chunk < 1 || o.group < 1 || o.result_bytes < 40) Usage();
  return o;
}

[[noreturn]] void Die(const std::string& what, const Status& s) {
  std::fprintf(stderr, "store_bench: %s: %s\n", what.c_str(), s.ToString().c_str());
  std::exit(1);
}

std::string ResultLine(int64_t line, int bytes) {
  std::string s = "{\"id\":\"batch_req_" + std::to_string(line) + "\",\"custom_id\":\"req-" + std::to_string(line) +
                  "\",\"response\":{\"status_code\":200,\"body\":\"";
  while (static_cast<int>(s.size()) < bytes - 4) s.push_back(static_cast<char>('a' + line % 26));
  return s + "\"}}";
}

struct Result {
  double seconds = 0;
  int64_t rows = 0, commits = 0, claims = 0;
};

// Runs the workers on stores made by `open` (one each) against batch
// `batch_id`, already added with its rows.
Result RunWorkers(const Options& o, const std::function<std::unique_ptr<ks::Store>()>& open) {
  std::vector<std::unique_ptr<ks::Store>> stores;
  for (int i = 0; i < o.workers; ++i) stores.push_back(open());
  std::atomic<int64_t> rows{0}, commits{0}, claims{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < o.workers; ++w) {
    threads.emplace_back([&, w] {
      ks::Store& store = *stores[static_cast<size_t>(w)];
      const std::string owner = "bench-worker-" + std::to_string(w);
      while (!go.load()) std::this_thread::yield();
      for (;;) {
        auto claim = store.ClaimChunk(owner, {}, 60'000);
        if (!claim.ok()) Die("claim", claim.status());
        if (!*claim) return;
        ++claims;
        const ks::ChunkClaim& c = **claim;
        for (size_t i = 0; i < c.rows.size(); i += static_cast<size_t>(o.group)) {
          std::vector<ks::RequestOutcome> group;
          for (size_t k = i; k < std::min(c.rows.size(), i + static_cast<size_t>(o.group)); ++k)
            group.push_back({c.rows[k].line, true, ResultLine(c.rows[k].line, o.result_bytes), 1900, 1800, 32});
          auto n = store.CommitFenced(c.fence, group, 60'000);
          if (!n.ok()) Die("commit", n.status());
          rows += *n;
          ++commits;
        }
      }
    });
  }
  const auto start = std::chrono::steady_clock::now();
  go = true;
  for (auto& t : threads) t.join();
  Result r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.rows = rows;
  r.commits = commits;
  r.claims = claims;
  return r;
}

// Puts the batch and its rows (timed apart from the workers); checks after
// the run that every row was counted exactly once.
Result Bench(const Options& o, ks::Store& setup, const std::function<std::unique_ptr<ks::Store>()>& open) {
  const std::string batch_id = "batch_bench_" + std::to_string(::getpid()) + "_" +
                               std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
  ks::BatchRecord b;
  b.id = batch_id;
  b.endpoint = "/v1/chat/completions";
  b.input_file_id = "file-bench";
  b.completion_window = "24h";
  b.created_at = std::time(nullptr);
  if (Status s = setup.PutBatch(b); !s.ok()) Die("put batch", s);
  std::vector<ks::PendingRequest> rows;
  for (int line = 1; line <= o.rows; ++line)
    rows.push_back({line, "req-" + std::to_string(line), int64_t{line} * 2000, 1900, 42, 0, (line - 1) / o.chunk});
  const auto add_start = std::chrono::steady_clock::now();
  if (Status s = setup.AddRequests(batch_id, rows, b.created_at); !s.ok()) Die("add requests", s);
  const double add_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - add_start).count();
  std::printf("  (adding %d rows took %.2f s)\n", o.rows, add_s);

  Result r = RunWorkers(o, open);
  auto done = setup.GetBatch(batch_id);
  if (!done.ok()) Die("get batch", done.status());
  if (done->counts.completed != o.rows || r.rows != o.rows) {
    std::fprintf(stderr, "store_bench: %lld rows counted, %lld recorded, %d expected\n",
                 static_cast<long long>(done->counts.completed), static_cast<long long>(r.rows), o.rows);
    std::exit(1);
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  std::string tmpl = "/tmp/kvb_store_bench_XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) Die("temp dir", Status::IoError(std::strerror(errno)));
  const std::string dir = tmpl;
  std::printf("store_bench: %d workers, %d rows in chunks of %d, commits of %d, result lines of %d bytes\n", o.workers,
              o.rows, o.chunk, o.group, o.result_bytes);

  struct Row {
    std::string store;
    Result r;
  };
  std::vector<Row> table;
  if (o.stores.find("sqlite") != std::string::npos) {
    std::printf("sqlite (WAL file, synchronous=FULL) in %s\n", dir.c_str());
    const std::string db = dir + "/bench.db", files = dir + "/files";
    std::filesystem::create_directories(files);
    auto open = [&]() -> std::unique_ptr<ks::Store> {
      auto s = ks::SqliteStore::Open(db, files);
      if (!s.ok()) Die("open sqlite", s.status());
      return std::move(s).value();
    };
    auto setup = open();
    table.push_back({"sqlite", Bench(o, *setup, open)});
  }
  std::unique_ptr<kvb::testing::PgTestServer> server;
  if (o.stores.find("postgres") != std::string::npos) {
    std::string uri = o.pg_uri;
    if (uri.empty()) {
      server = std::make_unique<kvb::testing::PgTestServer>();
      if (!server->ok()) Die("PostgreSQL server", Status::Unavailable(server->error()));
      std::string error;
      if (!server->CreateDatabase("kvb_bench", &error)) Die("create database", Status::Internal(error));
      uri = server->UriFor("kvb_bench");
      std::printf("postgres (private server, fsync on, synchronous_commit on) at %s\n", uri.c_str());
    } else {
      std::printf("postgres at %s\n", uri.c_str());
    }
    auto open = [&]() -> std::unique_ptr<ks::Store> {
      auto s = ks::PgStore::Open(uri);
      if (!s.ok()) Die("open postgres", s.status());
      return std::move(s).value();
    };
    auto setup = open();
    table.push_back({"postgres", Bench(o, *setup, open)});
  }

  std::printf("\n%-10s %8s %8s %10s %12s %12s %10s\n", "store", "workers", "rows", "seconds", "results/s",
              "commits/s", "claims/s");
  for (const Row& row : table)
    std::printf("%-10s %8d %8lld %10.2f %12.0f %12.0f %10.0f\n", row.store.c_str(), o.workers,
                static_cast<long long>(row.r.rows), row.r.seconds, row.r.rows / row.r.seconds,
                row.r.commits / row.r.seconds, row.r.claims / row.r.seconds);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return 0;
}
