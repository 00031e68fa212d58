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

#include "api/metrics_server.h"
#include "api/server.h"
#include "batch/crash_guard.h"
#include "metrics/metrics.h"
#include "cli/models_command.h"
#include "models/model_store.h"
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
  // First: the engines' threads report to it until they stop.
  std::unique_ptr<metrics::Metrics> metrics = std::make_unique<metrics::Metrics>();
  std::unique_ptr<store::Store> store;
  std::vector<std::unique_ptr<engine::Model>> models;  // one per device
  std::vector<std::unique_ptr<worker::EngineHub>> hubs;
  std::unique_ptr<worker::ModelRouter> router;  // several models (-m A -m B): instead of models/hubs
  std::unique_ptr<worker::BatchDriver> driver;
  int lock_fd = -1;

  ~Node() {
    if (driver) driver->Stop();
    // The engines go before the driver: their threads may still call back into it.
    hubs.clear();
    router.reset();
    driver.reset();
    if (lock_fd >= 0) ::close(lock_fd);
  }
  // Online requests go to the first engine; batch work to all of them.
  worker::EngineHub* hub() const { return hubs.empty() ? nullptr : hubs.front().get(); }
  const engine::Model* model() const { return models.empty() ? nullptr : models.front().get(); }

  std::string Describe() const {
    if (router) {
      auto first = router->LoadedHub(0);
      return std::to_string(router->specs().size()) + " models: " + router->Names() + "; " +
             (first ? first->info().device : "") +
             ", " + std::to_string(router->max_seqs()) + " sequences each";
    }
    std::string out;
    for (size_t i = 0; i < hubs.size(); ++i) {
      const auto& info = hubs[i]->info();
      if (i > 0) out += "; ";
      out += info.device + ", " + std::to_string(info.max_seqs) + " sequences, " + std::to_string(info.kv_cells) +
             " KV cells";
    }
    return out;
  }

  metrics::Sources MetricSources() const {
    metrics::Sources src;
    for (const auto& h : hubs) src.engines.push_back([hub = h.get()] { return api::Snapshot(*hub); });
    if (router)
      for (int i = 0; i < static_cast<int>(router->specs().size()); ++i)
        src.engines.push_back([r = router.get(), i] { return api::RouterSnapshot(*r, i); });
    src.batches = [this] {
      std::vector<metrics::BatchSample> out;
      using BS = store::BatchStatus;
      auto active = store->BatchesWithStatus({BS::kValidating, BS::kInProgress, BS::kFinalizing, BS::kCancelling});
      if (!active.ok()) return out;
      for (const auto& b : *active) {
        metrics::BatchSample s{b.id, std::string(store::ToString(b.status)), b.counts.total, b.counts.completed, b.counts.failed};
        if (auto p = driver->Progress(b.id)) {
          s.requests_per_second = p->requests_per_second;
          s.eta_seconds = p->eta_seconds;
        }
        out.push_back(std::move(s));
      }
      return out;
    };
    src.driver = [this] {
      auto s = driver->Stats();
      return s ? api::DriverSampleOf(*s) : metrics::DriverSample{};
    };
    return src;
  }

  void PrintStats(const char* who) const {
    auto per = driver->EngineStats();
    for (size_t i = 0; i < per.size(); ++i) {
      const auto& s = per[i];
      const std::string tag = per.size() > 1 ? " engine " + std::to_string(i) : "";
      std::fprintf(stderr,
                   "kvbatch %s%s: %lld chunks claimed (%lld prefix groups), %lld results committed, %lld chunks "
                   "lost, %lld results dropped\n",
                   who, tag.c_str(), static_cast<long long>(s.chunks_claimed),
                   static_cast<long long>(s.distinct_prefixes), static_cast<long long>(s.results_committed),
                   static_cast<long long>(s.chunks_lost), static_cast<long long>(s.results_dropped));
    }
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
  if (need_model && !o.more_models.empty()) {
    // Several models: loaded by the router, the first one now.
    if (!o.devices.empty()) return Fail(who, "--devices and several -m cannot be combined yet");
    auto router = StartModels({o.model, o.model_name, o.model_source, o.more_models, o.max_models, o.n_gpu_layers},
                              o.engine, node.metrics.get());
    if (!router.ok()) return Fail(who, router.status().message());
    node.router = std::move(router).value();
  } else if (need_model) {
    if (std::error_code e; !fs::is_regular_file(o.model, e)) return Fail(who, "model not found: " + o.model);
    // Data parallel: a copy of the model and an engine per device.
    const std::vector<std::string> devices = o.devices.empty() ? std::vector<std::string>{""} : o.devices;
    for (const std::string& device : devices) {
      auto model = engine::Model::Load({o.model, o.n_gpu_layers, device, o.model_name});
      if (!model.ok())
        return Fail(who, models::ExplainLoadFailure({o.model_name, o.model, o.model_source}, model.status().message()));
      node.models.push_back(std::move(model).value());
      const int index = static_cast<int>(node.hubs.size());
      metrics::Metrics* m = node.metrics.get();
      engine::EngineOptions eo = o.engine;
      eo.on_step = [m, index](const engine::StepInfo& step) { m->ObserveStep(index, step); };
      auto hub = worker::EngineHub::Start(node.models.back().get(), eo,
                                          [m, index](const engine::Result& r) { m->ObserveResult(index, r); });
      if (!hub.ok()) return Fail(who, hub.status().message());
      node.hubs.push_back(std::move(hub).value());
    }
  }
  worker::DriverOptions d = o.driver;
  d.cache_dir = files.string();
  d.default_max_tokens = o.server.default_max_tokens;
  std::vector<worker::EngineClient*> engines;
  for (const auto& h : node.hubs) engines.push_back(h.get());
  if (node.router) engines.push_back(node.router.get());
  node.driver = std::make_unique<worker::BatchDriver>(node.store.get(), engines, d);
  node.metrics->SetSources(node.MetricSources());
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
  ctx.hub = node.hub();
  ctx.driver = node.driver.get();
  ctx.model = node.model();
  ctx.router = node.router.get();
  for (const auto& h : node.hubs) ctx.engines.push_back(h.get());
  ctx.metrics = node.metrics.get();
  ctx.options = o.server;
  ctx.options.files_dir = (fs::path(o.data_dir) / "files").string();
  metrics::Sources sources = node.MetricSources();
  sources.online_requests = [count = ctx.online_requests] { return static_cast<int64_t>(count->load()); };
  node.metrics->SetSources(std::move(sources));
  api::Server server(ctx);
  if (Status st = server.Bind(); !st.ok()) return Fail("serve", st.message());

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig != 0) server.Stop();
  });

  node.driver->Start();
  const std::string where = store::IsPostgresUri(o.store) ? "store PostgreSQL" : "data in " + o.data_dir;
  if (node.router) {
    std::printf("kvbatch serve: listening on http://%s:%d/v1 (%s; %s)\n", o.server.host.c_str(), server.port(),
                node.Describe().c_str(), where.c_str());
  } else if (node.hub()) {
    std::printf("kvbatch serve: listening on http://%s:%d/v1 (model %s, %s; %s)\n", o.server.host.c_str(),
                server.port(), node.model()->name().c_str(), node.Describe().c_str(), where.c_str());
  } else {
    std::printf("kvbatch serve: listening on http://%s:%d/v1 (no model: batches run on workers; %s)\n",
                o.server.host.c_str(), server.port(), where.c_str());
  }
  std::fflush(stdout);
  Status st = server.Run();
  std::fprintf(stderr, "kvbatch serve: stopping\n");
  node.driver->Stop();
  node.PrintStats("serve");
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
  std::unique_ptr<api::MetricsServer> metrics_server;
  if (o.metrics_port >= 0) {
    metrics_server = std::make_unique<api::MetricsServer>(node.metrics.get(), o.metrics_host, o.metrics_port);
    if (Status st = metrics_server->Start(); !st.ok()) return Fail("worker", st.message());
    std::printf("kvbatch worker: metrics on http://%s:%d/metrics\n", o.metrics_host.c_str(), metrics_server->port());
  }
  node.driver->Start();
  std::printf("kvbatch worker: running batches from PostgreSQL (model %s, %s)\n",
              node.router ? node.router->model_name().c_str() : node.model()->name().c_str(), node.Describe().c_str());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "kvbatch worker: stopping\n");
  if (metrics_server) metrics_server->Stop();
  node.driver->Stop();
  node.PrintStats("worker");
  return 0;
}

}  // namespace kvb::cli
