// A small HTTP server with GET /metrics alone, for processes without the
// API: `kvbatch run --metrics-port N` and `kvbatch worker --metrics-port N`.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "metrics/metrics.h"
#include "util/status.h"

namespace httplib {
class Server;
}

namespace kvb::api {

class MetricsServer {
 public:
  MetricsServer(metrics::Metrics* metrics, std::string host, int port);
  ~MetricsServer();  // stops

  // Binds (port 0: any free port) and serves on a thread of its own.
  Status Start();
  void Stop();
  int port() const { return port_; }

 private:
  std::unique_ptr<httplib::Server> http_;
  std::string host_;
  int port_;
  std::thread thread_;
};

}  // namespace kvb::api
