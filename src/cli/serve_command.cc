#include "cli/serve_command.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "store/sqlite_store.h"
#include "worker/batch_worker.h"
#include "worker/engine_hub.h"

namespace kvb::cli {

namespace fs = std::filesystem;

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "kvbatch serve: %s\n", what.c_str());
  return 1;
}

}  // namespace

int Serve(const ServeOptions& o) {
  // SIGINT/SIGTERM stop the server from a thread of their own (sigwait), so
  // nothing runs in a signal handler. Blocked before any thread starts (the
  // model loader and the engine start threads), so every thread inherits it.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::error_code ec;
  const fs::path data = o.data_dir;
  const fs::path files = data / "files";
  fs::create_directories(files, ec);
  if (ec) return Fail("cannot create " + files.string() + ": " + ec.message());
  fs::permissions(data, fs::perms::owner_all, ec);

  // One server per data directory: two would answer the same requests.
  const std::string lock_path = (data / "serve.lock").string();
  const int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd < 0 || ::flock(lock_fd, LOCK_EX | LOCK_NB) != 0)
    return Fail("another kvbatch serve uses " + data.string());

  // Leftovers of uploads and result files a crash interrupted.
  for (const auto& entry : fs::directory_iterator(files, ec)) {
    const std::string ext = entry.path().extension().string();
    if (ext == ".upload" || ext == ".tmp") fs::remove(entry.path(), ec);
  }

  auto store = store::SqliteStore::Open((data / "kvbatch.db").string());
  if (!store.ok()) return Fail(store.status().message());
  if (std::error_code e; !fs::is_regular_file(o.model, e)) return Fail("model not found: " + o.model);
  auto model = engine::Model::Load({o.model, o.n_gpu_layers});
  if (!model.ok()) return Fail(model.status().message());
  auto hub = worker::EngineHub::Start(model->get(), o.engine);
  if (!hub.ok()) return Fail(hub.status().message());

  worker::WorkerOptions wo;
  wo.files_dir = files.string();
  wo.default_max_tokens = o.server.default_max_tokens;
  wo.window = o.window;
  worker::BatchWorker worker(store->get(), hub->get(), model->get(), wo);

  api::Context ctx;
  ctx.store = store->get();
  ctx.hub = hub->get();
  ctx.worker = &worker;
  ctx.model = model->get();
  ctx.options = o.server;
  ctx.options.files_dir = files.string();
  api::Server server(ctx);
  if (Status st = server.Bind(); !st.ok()) return Fail(st.message());

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig != 0) server.Stop();
  });

  worker.Start();
  const auto& info = (*hub)->info();
  std::printf("kvbatch serve: listening on http://%s:%d/v1 (model %s, %s, %d sequences, %d KV cells; data in %s)\n",
              o.server.host.c_str(), server.port(), (*model)->name().c_str(), info.device.c_str(), info.max_seqs,
              info.kv_cells, data.c_str());
  std::fflush(stdout);
  Status st = server.Run();
  std::fprintf(stderr, "kvbatch serve: stopping\n");
  worker.Stop();
  // The engine goes before the worker: its thread may still call back into it.
  hub->reset();
  // Wake the signal thread if the server stopped for another reason.
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  if (!st.ok()) return Fail(st.message());
  return 0;
}

}  // namespace kvb::cli
