// The web dashboard: GET / and the files it loads, from the copy compiled
// into the binary (web/assets.h). KVBATCH_WEB_DIR=DIR serves them from DIR
// instead, so the page can be worked on without rebuilding.
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "api/routes.h"
#include "web/assets.h"

namespace kvb::api {

namespace {

const char* ContentType(std::string_view path) {
  auto ends = [&](std::string_view ext) {
    return path.size() >= ext.size() && path.substr(path.size() - ext.size()) == ext;
  };
  if (ends(".html")) return "text/html; charset=utf-8";
  if (ends(".js")) return "text/javascript; charset=utf-8";
  if (ends(".css")) return "text/css; charset=utf-8";
  if (ends(".svg")) return "image/svg+xml";
  if (ends(".png")) return "image/png";
  if (ends(".ico")) return "image/x-icon";
  if (ends(".json")) return "application/json";
  return "application/octet-stream";
}

bool Serve(const std::string& path, httplib::Response& res) {
  std::string body;
  if (const char* dir = std::getenv("KVBATCH_WEB_DIR"); dir != nullptr && *dir != '\0') {
    std::ifstream in(std::string(dir) + "/" + path, std::ios::binary);
    if (!in) return false;
    std::ostringstream ss;
    ss << in.rdbuf();
    body = ss.str();
  } else {
    bool found = false;
    for (const web::Asset& a : web::Assets()) {
      if (a.path != path) continue;
      body.assign(a.data);
      found = true;
      break;
    }
    if (!found) return false;
  }
  // Everything the page loads comes from this server; the data it shows
  // (custom_ids, error messages) is the users', and never runs as script.
  res.set_header("Content-Security-Policy",
                 "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                 "object-src 'none'; base-uri 'none'; frame-ancestors 'none'");
  res.set_header("X-Content-Type-Options", "nosniff");
  res.set_header("Cache-Control", "no-cache");
  res.set_content(std::move(body), ContentType(path));
  return true;
}

}  // namespace

void AddWebRoutes(httplib::Server& http, Context&) {
  http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    if (!Serve("index.html", res))
      SendError(res, 404, "This build of kvbatch has no dashboard.", "not_found");
  });
  // Paths of plain names only (no "..", no hidden files), with an extension.
  http.Get(R"(/((?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_-]+\.[A-Za-z0-9]+))",
           [](const httplib::Request& req, httplib::Response& res) {
             const std::string path = req.matches[1].str();
             if (!Serve(path, res)) SendError(res, 404, "Unknown request URL: GET " + req.path + ".", "unknown_url");
           });
}

}  // namespace kvb::api
