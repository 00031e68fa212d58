// Whether the client of a request has gone away, for handlers that wait on
// the engine without writing (a non-streaming completion): its work is
// then cancelled instead of running for nobody. cpp-httplib 0.11 does not
// expose a request's socket, so it is found once by its address pair.
#pragma once

namespace httplib {
struct Request;
}

namespace kvb::api {

class ConnectionWatch {
 public:
  explicit ConnectionWatch(const httplib::Request& req);
  // True once the peer has closed or reset the connection. False when the
  // socket could not be found (then the request simply runs to its end).
  bool Gone() const;

 private:
  int fd_ = -1;
};

}  // namespace kvb::api
