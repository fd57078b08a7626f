#!/usr/bin/env bash
# Builds the Debian package of the gateway, installs it, and checks the installed
# configuration with the installed binary:
#
#   1. installs cargo-deb when it is missing (cargo install --locked cargo-deb);
#   2. cargo deb -p gateway (a release build) -> target/debian/mqtt-sn-gateway_*.deb;
#   3. dpkg -i, as root or through sudo without a password;
#   4. /usr/bin/mqtt-sn-gateway --check-config -c /etc/mqtt-sn-gateway/gateway.toml,
#      and checks that the unit and the conffile are where the package says.
#
# The service is not started (systemctl needs a running systemd). With --remove the
# package is removed again at the end (dpkg -r; the conffile stays, as dpkg does).
# Without root or passwordless sudo, steps 3-4 cannot run: under CI=true that is a
# failure, elsewhere they are skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."

remove=no
for arg in "$@"; do
  case "$arg" in
    --remove) remove=yes ;;
    *) echo "usage: $0 [--remove]" >&2; exit 2 ;;
  esac
done

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

step() { echo "==> $*"; }
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }

start=$(date +%s)

if ! cargo deb --version >/dev/null 2>&1; then
  step "installing cargo-deb (cargo install --locked cargo-deb)"
  cargo install --locked cargo-deb || fail "cannot install cargo-deb"
fi
step "$(cargo deb --version)"

step "building the package (cargo deb -p gateway)"
out=$(cargo deb -p gateway) || fail "cargo deb -p gateway"
deb=$(printf '%s\n' "$out" | tail -n 1)
[ -f "$deb" ] || fail "cargo deb printed no package path (got: $deb)"
step "built $deb ($(du -h "$deb" | cut -f1))"

if ! command -v dpkg >/dev/null 2>&1; then
  if [ "${CI:-}" = true ]; then fail "dpkg is not installed"; fi
  echo "package-test: SKIPPED installing: no dpkg on this machine (the package was built)" >&2
  exit 0
fi

step "contents"
# Read whole, then searched: `dpkg-deb | grep -q` would end the pipe early, and with
# pipefail dpkg-deb's broken pipe would fail the check at random.
contents=$(dpkg-deb --contents "$deb")
echo "$contents"
for path in ./usr/bin/mqtt-sn-gateway ./etc/mqtt-sn-gateway/gateway.toml ./lib/systemd/system/mqtt-sn-gateway.service ./usr/share/doc/mqtt-sn-gateway/prometheus-alerts.yml; do
  grep -q " $path\$" <<<"$contents" || fail "the package lacks $path"
done
conffiles=$(dpkg-deb --info "$deb" conffiles)
grep -qx "/etc/mqtt-sn-gateway/gateway.toml" <<<"$conffiles" \
  || fail "/etc/mqtt-sn-gateway/gateway.toml is not a conffile"

if ! as_root true; then
  if [ "${CI:-}" = true ]; then
    fail "installing the package needs root or passwordless sudo (dpkg -i), and this is neither"
  fi
  echo "package-test: SKIPPED installing: not root and no passwordless sudo; run as root to install $deb and check it" >&2
  exit 0
fi

step "installing (dpkg -i)"
as_root dpkg -i "$deb" || fail "dpkg -i $deb"

step "checking the installed configuration with the installed binary"
[ -x /usr/bin/mqtt-sn-gateway ] || fail "/usr/bin/mqtt-sn-gateway is not installed"
[ -f /lib/systemd/system/mqtt-sn-gateway.service ] || fail "the systemd unit is not installed"
# shellcheck disable=SC2016 # $MAINPID is systemd's, not the shell's
grep -qxF 'ExecReload=/bin/kill -HUP $MAINPID' /lib/systemd/system/mqtt-sn-gateway.service \
  || fail "the unit has no ExecReload: systemctl reload would not reload the configuration"
grep -qxF 'StateDirectory=mqtt-sn-gateway' /lib/systemd/system/mqtt-sn-gateway.service \
  || fail "the unit has no StateDirectory: the packaged [state] dir would not exist"
/usr/bin/mqtt-sn-gateway --version
/usr/bin/mqtt-sn-gateway --check-config -c /etc/mqtt-sn-gateway/gateway.toml \
  || fail "the installed configuration does not pass --check-config"
if command -v systemd-analyze >/dev/null 2>&1; then
  step "systemd-analyze verify (the unit's syntax; the service is not started)"
  systemd-analyze verify /lib/systemd/system/mqtt-sn-gateway.service \
    || fail "systemd-analyze verify reports problems in the unit"
fi

if [ "$remove" = yes ]; then
  step "removing (dpkg -r)"
  as_root dpkg -r mqtt-sn-gateway || fail "dpkg -r mqtt-sn-gateway"
fi

echo "package-test: OK ($deb, $(( $(date +%s) - start )) s)"
