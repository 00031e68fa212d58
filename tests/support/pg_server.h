// A private PostgreSQL server for tests and benchmarks: started by
// scripts/pg_test_server.sh in a fresh directory under /tmp (short enough
// for a Unix socket path, and reachable by the `postgres` user when the
// tests run as root), stopped and removed by the destructor.
//
// The script's path comes from KVBATCH_PG_TEST_SCRIPT (a compile
// definition; the environment variable of that name overrides it). When the
// PostgreSQL binaries are missing, ok() is false and error() names the
// Debian package to install: tests must fail on it, not skip (CI installs
// the package).
#pragma once

#include <libpq-fe.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

namespace kvb::testing {

class PgTestServer {
 public:
  PgTestServer() {
    std::string tmpl = "/tmp/kvb_pg_XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      error_ = "cannot create a directory under /tmp for the PostgreSQL test server";
      return;
    }
    dir_ = tmpl;
    ok_ = Start();
  }
  ~PgTestServer() {
    if (dir_.empty()) return;
    Stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  PgTestServer(const PgTestServer&) = delete;
  PgTestServer& operator=(const PgTestServer&) = delete;

  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  const std::string& dir() const { return dir_; }
  // The `postgres` database's URI: "postgresql:///postgres?host=DIR/sock&user=kvb".
  const std::string& uri() const { return uri_; }
  // The same server, database `db`.
  std::string UriFor(const std::string& db) const {
    const std::string prefix = "postgresql:///postgres";
    return uri_.rfind(prefix, 0) == 0 ? "postgresql:///" + db + uri_.substr(prefix.size()) : uri_;
  }

  // Starts the server on the same data directory (after Stop); true when it runs.
  bool Start() {
    std::string out;
    // With our pid: the server goes when this process does, however it ends.
    if (!RunScript(("start '" + dir_ + "' " + std::to_string(getpid())).c_str(), &out)) {
      error_ = out;
      return false;
    }
    // The URI is the script's last line of output.
    while (!out.empty() && out.back() == '\n') out.pop_back();
    uri_ = out.substr(out.find_last_of('\n') == std::string::npos ? 0 : out.find_last_of('\n') + 1);
    return true;
  }
  // Stops it (fast shutdown: connected sessions are ended).
  bool Stop() {
    std::string out;
    if (!RunScript(("stop '" + dir_ + "'").c_str(), &out)) {
      error_ = out;
      return false;
    }
    return true;
  }
  bool Restart() { return Stop() && Start(); }

  // CREATE DATABASE `name` (a plain identifier): a fresh database per test.
  bool CreateDatabase(const std::string& name, std::string* error) {
    PGconn* c = PQconnectdb(uri_.c_str());
    bool created = false;
    if (PQstatus(c) == CONNECTION_OK) {
      PGresult* r = PQexec(c, ("CREATE DATABASE " + name).c_str());
      created = PQresultStatus(r) == PGRES_COMMAND_OK;
      if (!created) *error = PQresultErrorMessage(r);
      PQclear(r);
    } else {
      *error = PQerrorMessage(c);
    }
    PQfinish(c);
    return created;
  }

  static std::string Script() {
    if (const char* env = getenv("KVBATCH_PG_TEST_SCRIPT"); env && *env) return env;
#ifdef KVBATCH_PG_TEST_SCRIPT
    return KVBATCH_PG_TEST_SCRIPT;
#else
    return "scripts/pg_test_server.sh";
#endif
  }

 private:
  // Runs the script with `args`; its stdout and stderr together in *out.
  bool RunScript(const char* args, std::string* out) {
    std::string cmd = "'";
    cmd.append(Script()).append("' ").append(args).append(" 2>&1");
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) {
      out->assign("cannot run ").append(Script());
      return false;
    }
    char buf[512];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
    const int status = pclose(p);
    const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (rc == 0) return true;
    std::string why = rc == 3 ? std::string("PostgreSQL server binaries are missing: install the Debian packages "
                                            "'postgresql' and 'libpq-dev' (scripts/packages.sh). ")
                              : std::string("scripts/pg_test_server.sh ") + args + " failed (exit " +
                                    std::to_string(rc) + "): ";
    why.append(*out);
    *out = std::move(why);
    return false;
  }

  std::string dir_;
  std::string uri_;
  std::string error_;
  bool ok_ = false;
};

}  // namespace kvb::testing
