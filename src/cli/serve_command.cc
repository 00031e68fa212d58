#include "cli/serve_command.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <thread>

#include "batch/crash_guard.h"
#include "store/open_store.h"
#include "worker/batch_driver.h"
#include "worker/engine_hub.h"

namespace kvb::cli {

namespace fs = std::filesystem;

namespace {

int Fail(const char* who, const std::string& what) {
  std::fprintf(stderr, "kvbatch %s: %s\n", who, what.c_str());
  return 1;
}

// SIGINT/SIGTERM stop the node from a thread of their own (sigwait), so
// nothing runs in a signal handler. Blocked before any thread starts (the
// model loader and the engine start threads), so every thread inherits it.
sigset_t BlockStopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

// What serve and worker share: the store, the model and engine (when there
// is one) and the batch driver, torn down in the right order.
struct Node {
  std::unique_ptr<store::Store> store;
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<worker::EngineHub> hub;
  std::unique_ptr<worker::BatchDriver> driver;
  int lock_fd = -1;

  ~Node() {
    if (driver) driver->Stop();
    // The engine goes before the driver: its thread may still call back into it.
    hub.reset();
    driver.reset();
    if (lock_fd >= 0) ::close(lock_fd);
  }
};

int Open(const char* who, const ServeOptions& o, Node& node, bool need_model) {
  std::error_code ec;
  const fs::path data = o.data_dir;
  const fs::path files = data / "files";
  fs::create_directories(files, ec);
  if (ec) return Fail(who, "cannot create " + files.string() + ": " + ec.message());
  fs::permissions(data, fs::perms::owner_all, ec);
  const bool shared = store::IsPostgresUri(o.store);

  // One process per data directory: with SQLite, two would answer the same
  // requests; with PostgreSQL, they would share one cache.
  const std::string lock_path = (data / "serve.lock").string();
  node.lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (node.lock_fd < 0 || ::flock(node.lock_fd, LOCK_EX | LOCK_NB) != 0)
    return Fail(who, "another kvbatch serve or worker uses " + data.string() + " (give each its own --data-dir)");

  // Leftovers of uploads, copies and result files a crash interrupted.
  for (const auto& entry : fs::directory_iterator(files, ec)) {
    const std::string ext = entry.path().extension().string();
    if (ext == ".tmp" || ext == ".upload") fs::remove(entry.path(), ec);
  }

  auto st = store::OpenStore(shared ? o.store : (o.store.empty() ? (data / "kvbatch.db").string() : o.store),
                             files.string());
  if (!st.ok()) return Fail(who, st.status().message());
  node.store = std::move(st).value();
  if (!shared) {
    // This process is the store's only user: leases left in it are a dead
    // process's, and the requests they were running are suspects.
    if (auto n = node.store->RecoverInFlight(); !n.ok()) {
      return Fail(who, n.status().message());
    } else if (*n > 0) {
      std::fprintf(stderr,
                   "kvbatch: %lld request(s) were running when the server stopped unexpectedly; each runs again "
                   "alone (one in flight during %d crashes fails with %s)\n",
                   static_cast<long long>(*n), batch::kMaxCrashes, batch::kCrashedEngine);
    }
  }
  if (need_model) {
    if (std::error_code e; !fs::is_regular_file(o.model, e)) return Fail(who, "model not found: " + o.model);
    auto model = engine::Model::Load({o.model, o.n_gpu_layers});
    if (!model.ok()) return Fail(who, model.status().message());
    node.model = std::move(model).value();
    auto hub = worker::EngineHub::Start(node.model.get(), o.engine);
    if (!hub.ok()) return Fail(who, hub.status().message());
    node.hub = std::move(hub).value();
  }
  worker::DriverOptions d = o.driver;
  d.cache_dir = files.string();
  d.default_max_tokens = o.server.default_max_tokens;
  node.driver = std::make_unique<worker::BatchDriver>(node.store.get(), node.hub.get(), d);
  return 0;
}

}  // namespace

int Serve(const ServeOptions& o) {
  sigset_t signals = BlockStopSignals();
  Node node;
  const bool with_model = !o.model.empty();
  if (!with_model && !store::IsPostgresUri(o.store))
    return Fail("serve", "a model is needed (-m): only a node on a PostgreSQL store can run without one");
  if (int rc = Open("serve", o, node, with_model); rc != 0) return rc;

  api::Context ctx;
  ctx.store = node.store.get();
  ctx.hub = node.hub.get();
  ctx.driver = node.driver.get();
  ctx.model = node.model.get();
  ctx.options = o.server;
  ctx.options.files_dir = (fs::path(o.data_dir) / "files").string();
  api::Server server(ctx);
  if (Status st = server.Bind(); !st.ok()) return Fail("serve", st.message());

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig != 0) server.Stop();
  });

  node.driver->Start();
  const std::string where = store::IsPostgresUri(o.store) ? "store PostgreSQL" : "data in " + o.data_dir;
  if (node.hub) {
    const auto& info = node.hub->info();
    std::printf("kvbatch serve: listening on http://%s:%d/v1 (model %s, %s, %d sequences, %d KV cells; %s)\n",
                o.server.host.c_str(), server.port(), node.model->name().c_str(), info.device.c_str(), info.max_seqs,
                info.kv_cells, where.c_str());
  } else {
    std::printf("kvbatch serve: listening on http://%s:%d/v1 (no model: batches run on workers; %s)\n",
                o.server.host.c_str(), server.port(), where.c_str());
  }
  std::fflush(stdout);
  Status st = server.Run();
  std::fprintf(stderr, "kvbatch serve: stopping\n");
  node.driver->Stop();
  // Wake the signal thread if the server stopped for another reason.
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  if (!st.ok()) return Fail("serve", st.message());
  return 0;
}

int Worker(const ServeOptions& o) {
  sigset_t signals = BlockStopSignals();
  if (!store::IsPostgresUri(o.store))
    return Fail("worker", "--store must be a postgresql:// URI shared with the API nodes (an embedded SQLite "
                          "store belongs to one `kvbatch serve`)");
  Node node;
  if (int rc = Open("worker", o, node, true); rc != 0) return rc;
  node.driver->Start();
  const auto& info = node.hub->info();
  std::printf("kvbatch worker: running batches from PostgreSQL (model %s, %s, %d sequences, %d KV cells)\n",
              node.model->name().c_str(), info.device.c_str(), info.max_seqs, info.kv_cells);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "kvbatch worker: stopping\n");
  node.driver->Stop();
  if (auto s = node.driver->Stats()) {
    std::fprintf(stderr,
                 "kvbatch worker: %lld chunks claimed (%lld prefix groups), %lld results committed, %lld chunks lost, "
                 "%lld results dropped\n",
                 static_cast<long long>(s->chunks_claimed), static_cast<long long>(s->distinct_prefixes),
                 static_cast<long long>(s->results_committed), static_cast<long long>(s->chunks_lost),
                 static_cast<long long>(s->results_dropped));
  }
  return 0;
}

}  // namespace kvb::cli
