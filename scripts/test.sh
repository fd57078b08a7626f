#!/usr/bin/env bash
# The one command that sets up what the tests need and runs them all: the README's test
# command, and exactly what CI runs (.ci/run calls this script).
#
# Under CI=true (or with PACKAGE_TEST=1) it also builds the Debian package, installs it
# with dpkg and validates the installed configuration with the installed binary
# (scripts/package-test.sh); elsewhere that step is left out, since it installs into
# the system.
#
# It installs mosquitto, openssl (the DTLS tests' client), chromium (the HTML report
# check) and prometheus (promtool, the alerting rules check) with apt-get, as root or
# through sudo without a password, and cargo-nextest when they are missing, and says plainly what it could not install. Under
# CI=true a missing part is a failure; elsewhere the broker tests are skipped with a loud
# note, and plain `cargo test` stands in for nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
apt_updated=no

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ "$apt_updated" = no ]; then
    as_root apt-get update -qq || return 1
    apt_updated=yes
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

have_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}

echo "== setting up"
if ! have_mosquitto; then
  echo "mosquitto is missing: installing it with apt-get"
  apt_install mosquitto || true
  have_mosquitto || missing+=("mosquitto (apt-get install mosquitto, as root)")
fi
# The DTLS end-to-end tests (tests/tests/dtls.rs) drive `openssl s_client` as the device.
if ! command -v openssl >/dev/null 2>&1; then
  echo "openssl is missing: installing it with apt-get (for the DTLS tests)"
  apt_install openssl || true
  command -v openssl >/dev/null 2>&1 || missing+=("openssl (apt-get install openssl, as root)")
fi
# The HTML report check renders a simulator report in headless Chromium (Debian's package).
have_chromium() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}
if ! have_chromium; then
  echo "chromium is missing: installing it with apt-get (for the HTML report check)"
  apt_install chromium || true
  have_chromium || missing+=("chromium (apt-get install chromium, as root)")
fi
# packaging/prometheus-alerts.yml is checked with promtool (Debian's prometheus package).
if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool is missing: installing prometheus with apt-get (for the alerting rules check)"
  apt_install --no-install-recommends prometheus || true
  command -v promtool >/dev/null 2>&1 || missing+=("promtool (apt-get install prometheus, as root)")
fi
# The harness starts its own broker on a free loopback port; a packaged service is not needed.
export PATH="$PATH:/usr/sbin"

nextest=yes
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is missing: installing it with cargo install"
  if ! cargo install --locked cargo-nextest; then
    missing+=("cargo-nextest (cargo install --locked cargo-nextest)")
    nextest=no
  fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "could not install:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  if [ "${CI:-}" = true ]; then
    echo "CI=true: every part of the test suite is required; stopping." >&2
    exit 1
  fi
  echo "continuing without them: the tests that need them are skipped (with a note) or run with cargo test." >&2
fi

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== no_std build of sn-codec"
cargo build -p sn-codec --no-default-features
cargo build -p sn-codec --no-default-features --features client
cargo build -p sn-codec --no-default-features --features uart
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features
echo "== tests"
if [ "$nextest" = yes ]; then
  cargo nextest run --workspace --all-features --no-fail-fast
  cargo test --workspace --all-features --doc
else
  cargo test --workspace --all-features --no-fail-fast
fi
echo "== Prometheus alerting rules (promtool)"
if command -v promtool >/dev/null 2>&1; then
  promtool check rules packaging/prometheus-alerts.yml
else
  echo "promtool missing: alerting rules not checked (CI=true fails instead)" >&2
fi
echo "== simulator HTML report in headless Chromium"
bash scripts/html-report-check.sh
if [ "${CI:-}" = true ] || [ "${PACKAGE_TEST:-}" = 1 ]; then
  echo "== Debian package: build, install, check the installed configuration"
  bash scripts/package-test.sh --remove
else
  echo "== Debian package: not built (CI=true or PACKAGE_TEST=1 builds and installs it)"
fi
echo "== all tests passed"
