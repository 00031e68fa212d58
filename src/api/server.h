// `kvbatch serve`'s HTTP front: the OpenAI Files, Batches, Chat Completions,
// Completions and Models endpoints on cpp-httplib. JSON and HTTP stay here;
// batches go to the store and the batch driver, online requests straight to
// the engine (ahead of batch work).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/model.h"
#include "metrics/metrics.h"
#include "store/store.h"
#include "util/status.h"
#include "worker/batch_driver.h"
#include "worker/model_router.h"
#include "worker/engine_hub.h"

namespace httplib {
class Server;
}

namespace kvb::api {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 4080;             // 0: any free port (see Server::port)
  std::string api_key;         // empty: no authentication
  std::string files_dir;       // local scratch for uploads before they go to the store
  int64_t max_file_bytes = int64_t{16} << 30;  // uploads over this get 413
  int32_t default_max_tokens = 0;              // online requests without max_tokens
  // Hostile clients (DESIGN.md section 5): JSON bodies over max_body_bytes
  // (batch::Limits) get 413; a connection silent for read_timeout_s is
  // closed; online completions above max_online_requests at once get 429.
  int read_timeout_s = 10;
  int write_timeout_s = 60;
  int max_online_requests = 64;
  int http_threads = 256;  // connections served at once (slow ones included)
  int max_event_streams = 64;  // GET /v1/batches/{id}/events at once (each holds a thread)
};

// Wakes long-lived responses (event streams) when the server stops.
struct StopSignal {
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;
};

// The shared parts every route handler uses.
struct Context {
  store::Store* store = nullptr;
  worker::EngineHub* hub = nullptr;
  worker::BatchDriver* driver = nullptr;
  const engine::Model* model = nullptr;  // null with hub: an API node without a model
  worker::ModelRouter* router = nullptr;  // several models: hub and model are null, requests pick one
  ServerOptions options;
  int64_t started_at = 0;
  // Online completions running now (bounded by options.max_online_requests).
  std::shared_ptr<std::atomic<int>> online_requests = std::make_shared<std::atomic<int>>(0);
  std::shared_ptr<std::atomic<int>> event_streams = std::make_shared<std::atomic<int>>(0);
  std::shared_ptr<StopSignal> stop = std::make_shared<StopSignal>();
  std::vector<worker::EngineHub*> engines;  // every engine of the node (hub is the first)
  metrics::Metrics* metrics = nullptr;      // null: no /metrics
};

// What an engine looks like now, for /metrics and /v1/engines.
metrics::EngineSnapshot Snapshot(const worker::EngineHub& hub);
// The router's model `index`: its engine's snapshot, or zeros naming it
// while it is not loaded.
metrics::EngineSnapshot RouterSnapshot(worker::ModelRouter& router, int index);
// A batch driver's counters as /metrics reads them (serve, worker and run).
metrics::DriverSample DriverSampleOf(const worker::RunnerStats& s);

class Server {
 public:
  explicit Server(Context context);
  ~Server();

  // Binds the address; after this, port() is the bound port.
  Status Bind();
  // Serves until Stop(); returns when stopped.
  Status Run();
  void Stop();  // thread-safe
  int port() const { return port_; }

 private:
  Context ctx_;
  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
};

}  // namespace kvb::api
