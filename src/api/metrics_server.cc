#include "api/metrics_server.h"

#include <httplib.h>

namespace kvb::api {

MetricsServer::MetricsServer(metrics::Metrics* metrics, std::string host, int port)
    : http_(std::make_unique<httplib::Server>()), host_(std::move(host)), port_(port) {
  http_->new_task_queue = [] { return new httplib::ThreadPool(2); };
  http_->set_read_timeout(10, 0);
  http_->Get("/metrics", [metrics](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  http_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
}

MetricsServer::~MetricsServer() { Stop(); }

Status MetricsServer::Start() {
  if (port_ == 0) {
    port_ = http_->bind_to_any_port(host_);
    if (port_ <= 0) return Status::IoError("cannot bind " + host_ + " for metrics");
  } else if (!http_->bind_to_port(host_, port_)) {
    return Status::IoError("cannot listen on " + host_ + ":" + std::to_string(port_) + " for metrics (in use?)");
  }
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  return Status::Ok();
}

void MetricsServer::Stop() {
  if (!thread_.joinable()) return;
  http_->stop();
  thread_.join();
}

}  // namespace kvb::api
