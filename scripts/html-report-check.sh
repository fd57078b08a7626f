#!/usr/bin/env bash
# Renders a simulator HTML report (mqtt-sn-sim run --html) in headless Chromium, takes a
# screenshot and checks that it shows something: a PNG of the window's size with many
# distinct rows of pixels (a blank or broken page has a handful).
#
#   scripts/html-report-check.sh                      # generates a report first (--echo run)
#   scripts/html-report-check.sh REPORT.html [SHOT.png]
#
# Without a report it builds mqtt-sn-sim and makes one with a short `--echo` run (no
# gateway or broker needed). The screenshot goes to SHOT.png (default:
# target/html-report-check/report.png). Chromium is Debian's `chromium` package; when it
# is missing the check is skipped with a note, or fails under CI=true. Prints how long
# the rendering took.
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir=target/html-report-check
mkdir -p "$out_dir"
report=${1:-}
shot=${2:-$out_dir/report.png}
width=1280
height=2000

browser=""
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then
    browser=$b
    break
  fi
done
if [ -z "$browser" ]; then
  echo "html-report-check: no chromium found (apt-get install chromium)" >&2
  if [ "${CI:-}" = true ]; then exit 1; fi
  echo "html-report-check: skipped" >&2
  exit 0
fi

if [ -z "$report" ]; then
  report=$out_dir/report.html
  echo "== generating a report (mqtt-sn-sim run --echo)"
  CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build -q -p device-sim --bin mqtt-sn-sim
  cat >"$out_dir/scenario.toml" <<'TOML'
[[group]]
name = "sleepy"
count = 150
publish_interval = "2s"
jitter = "1s"
ramp = "1s"
sleep = { duration = "2s", awake = "300ms" }
radio = { loss = 0.05, delay_ms = 10, jitter_ms = 20 }

[[group]]
name = "mains"
count = 50
publish_interval = "500ms"
ramp = "1s"
TOML
  target/debug/mqtt-sn-sim run --echo -Q --scenario "$out_dir/scenario.toml" \
    --duration 5s --drain 2s --seed 1 \
    --html "$report" --timeseries "$out_dir/report.csv" >/dev/null
fi
[ -s "$report" ] || { echo "html-report-check: $report is missing or empty" >&2; exit 1; }

# The page stands alone: nothing loaded from elsewhere (no script, stylesheet or image
# link). Text may mention a URL (the gateway's metrics endpoint); attributes may not.
if grep -Eq '(src|href)=|url\(|@import|<script|<link' "$report"; then
  echo "html-report-check: $report refers to outside resources" >&2
  exit 1
fi
[ "$(grep -o '<html' "$report" | wc -l)" -eq 1 ] || { echo "html-report-check: not one <html> in $report" >&2; exit 1; }
grep -q '<svg' "$report" || { echo "html-report-check: no chart in $report" >&2; exit 1; }

profile=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$profile" "$log"' EXIT
rm -f "$shot"
url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
echo "== rendering $url with $browser"
start=$(date +%s.%N)
# --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
if ! timeout 120 "$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars \
  --user-data-dir="$profile" --no-first-run --disable-extensions \
  --screenshot="$shot" --window-size="$width,$height" "$url" >"$log" 2>&1; then
  cat "$log" >&2
  echo "html-report-check: $browser failed" >&2
  exit 1
fi
end=$(date +%s.%N)
[ -s "$shot" ] || { cat "$log" >&2; echo "html-report-check: no screenshot written" >&2; exit 1; }

if ! command -v python3 >/dev/null 2>&1; then
  # Without python3 only the size can be judged: a blank 1280x2000 page is about 10 KB.
  size=$(wc -c <"$shot")
  [ "$size" -gt 40000 ] || { echo "html-report-check: $shot is only $size bytes" >&2; exit 1; }
  echo "html-report-check: ok ($size bytes; python3 missing, pixels not checked), rendered in $(awk "BEGIN { printf \"%.1f\", $end - $start }") s"
  exit 0
fi
python3 - "$shot" "$width" "$height" <<'EOF'
import struct, sys, zlib

path, want_w, want_h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = open(path, "rb").read()
if data[:8] != b"\x89PNG\r\n\x1a\n":
    sys.exit(f"{path}: not a PNG")
pos, idat, w = 8, b"", None
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        w, h, depth, colour = struct.unpack(">IIBB", body[:10])
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
if w is None:
    sys.exit(f"{path}: no IHDR")
if (w, h) != (want_w, want_h):
    sys.exit(f"{path}: {w}x{h}, expected {want_w}x{want_h}")
channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
if depth != 8 or channels is None:
    sys.exit(f"{path}: unexpected PNG format (depth {depth}, colour type {colour})")
raw = zlib.decompress(idat)
stride = w * channels + 1
rows = {raw[i:i + stride] for i in range(0, len(raw), stride)}
# A blank page is one or two distinct rows; text, tables and charts make hundreds.
if len(rows) < 200:
    sys.exit(f"{path}: only {len(rows)} distinct pixel rows: a blank or broken page")
print(f"{path}: {w}x{h}, {len(data)} bytes, {len(rows)} distinct pixel rows")
EOF
echo "html-report-check: ok, rendered in $(awk "BEGIN { printf \"%.1f\", $end - $start }") s"
