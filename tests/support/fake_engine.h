// A fake engine for driver tests and the coordination benchmark: no model.
// It answers each request with "echo: <last message>" on a thread of its
// own, calling on_admit then on_result as the real engine does. Hold()
// keeps answers back (for cancel, pause and lost-lease tests) until Release().
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "worker/engine_client.h"

namespace kvb::testing {

class FakeEngine : public worker::EngineClient {
 public:
  explicit FakeEngine(std::string name = "fake") : name_(std::move(name)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~FakeEngine() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  std::variant<engine::Request, batch::RequestFailure> Prepare(batch::ParsedRequest&& request,
                                                               int32_t default_max_tokens) override {
    std::lock_guard<std::mutex> lock(mu_);
    engine::Request r;
    r.id = next_id_++;
    r.prompt = {1, 2, 3};
    r.sampling.max_tokens = request.sampling.max_tokens > 0 ? request.sampling.max_tokens : default_max_tokens;
    const std::string text = request.messages.empty() ? request.prompt : request.messages.back().content;
    if (text == "fail me") return batch::RequestFailure{400, "invalid_request", "asked to fail", ""};
    content_[r.id] = text;
    return r;
  }
  void SubmitAll(std::vector<std::pair<engine::Request, worker::RequestCallbacks>> requests) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [r, cb] : requests) {
        queue_.push_back(r.id);
        callbacks_[r.id] = std::move(cb);
      }
      submitted_ += static_cast<int64_t>(requests.size());
    }
    cv_.notify_all();
  }
  void Cancel(uint64_t id) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_.insert(id);
    }
    cv_.notify_all();
  }
  int32_t max_seqs() const override { return 8; }
  void SetAdmitFlush(std::function<void()> flush) override {
    std::lock_guard<std::mutex> lock(mu_);
    flush_ = std::move(flush);
  }
  std::string model_name() const override { return name_; }

  void Hold() {
    std::lock_guard<std::mutex> lock(mu_);
    hold_ = true;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      hold_ = false;
    }
    cv_.notify_all();
  }
  int64_t submitted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return submitted_;
  }

 private:
  // Like the real engine, "steps" of up to max_seqs() requests: admitted
  // together (one flush), then answered.
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] {
        if (stop_) return true;
        if (queue_.empty()) return false;
        return !hold_ || cancelled_.count(queue_.front()) > 0;
      });
      if (stop_) return;
      std::vector<std::pair<uint64_t, worker::RequestCallbacks>> step;
      while (!queue_.empty() && step.size() < static_cast<size_t>(max_seqs()) &&
             (!hold_ || cancelled_.count(queue_.front()) > 0)) {
        const uint64_t id = queue_.front();
        queue_.pop_front();
        step.emplace_back(id, std::move(callbacks_[id]));
        callbacks_.erase(id);
      }
      auto flush = flush_;
      lock.unlock();
      for (auto& [id, cb] : step)
        if (cb.on_admit) cb.on_admit();
      if (flush) flush();
      lock.lock();
      for (auto& [id, cb] : step) Answer(id, cb, lock);
    }
  }

  void Answer(uint64_t id, worker::RequestCallbacks& cb, std::unique_lock<std::mutex>& lock) {
    {
      engine::Result r;
      r.id = id;
      if (cancelled_.erase(id) > 0) {
        r.status = Status::Cancelled("cancelled");
      } else {
        r.text = "echo: " + content_[id];
        engine::Choice c;
        c.text = r.text;
        r.choices.push_back(c);
        r.prompt_tokens = 3;
        r.cached_tokens = 1;
        r.completion_tokens = 2;
        r.finish = engine::FinishReason::kStop;
      }
      content_.erase(id);
      lock.unlock();
      if (cb.on_result) cb.on_result(std::move(r));
      lock.lock();
    }
  }

  const std::string name_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool hold_ = false;
  uint64_t next_id_ = 1;
  int64_t submitted_ = 0;
  std::deque<uint64_t> queue_;
  std::map<uint64_t, worker::RequestCallbacks> callbacks_;
  std::map<uint64_t, std::string> content_;
  std::set<uint64_t> cancelled_;
  std::function<void()> flush_;
  std::thread thread_;
};

}  // namespace kvb::testing
