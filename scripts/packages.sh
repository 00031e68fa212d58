# Sourced by setup.sh, sanitize.sh and fuzz.sh: the Debian packages kvbatch
# builds with, and one way to install what is missing.

# libpq-dev builds the PostgreSQL store; postgresql gives the tests their
# private server (scripts/pg_test_server.sh). prometheus-cpp-dev: /metrics.
KVBATCH_BUILD_PKGS=(build-essential cmake git pkg-config ccache nlohmann-json3-dev libcli11-dev libgtest-dev
                    libgmock-dev libcpp-httplib-dev libsqlite3-dev libpq-dev postgresql prometheus-cpp-dev)
# Only the tests need these: promtool (in Debian's prometheus package)
# checks /metrics; chromium runs the dashboard's browser test (driven by
# the npm playwright-core; no browser download).
KVBATCH_TEST_PKGS=(prometheus chromium)

# ensure_packages PKG... [-- CMD...]: installs each Debian package not yet
# installed, and each CMD (a package of that name) not on PATH: tools that
# may come from elsewhere (nvm, pyenv) are only installed when missing.
ensure_packages() {
  local missing=() commands=0 p
  for p in "$@"; do
    if [ "$p" = -- ]; then commands=1; continue; fi
    if [ $commands = 1 ]; then
      command -v "$p" >/dev/null 2>&1 || missing+=("$p")
    else
      dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    fi
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[packages] installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
