#!/bin/bash
# Benchmark (docs/benchmarks.md, "Handshakes with a key per device"): 1,000 devices start
# at once over plain UDP, over DTLS with one key, and over DTLS with a key per device
# (derived; the gateway's registry written by mqtt-sn-sim registry), five rounds. Prints,
# per run, the report's counts, the gateway's CPU (utime+stime) over the run, the
# simulator's CPU, and for DTLS the time from the first to the 1,000th completed handshake
# (polled from the gateway's /metrics every 50 ms).
#
# Usage, from the repository root after `cargo build --release -p gateway -p device-sim`:
#   device-sim/scenarios/bench/dtls-handshakes.sh [TARGET_DIR]
# Needs mosquitto, python3, bc and GNU time; uses ports 10000, 10001, 18883 and 9109.
set -u
T=${1:-target}/release
B=$(mktemp -d)
trap 'rm -rf "$B"' EXIT
cp device-sim/scenarios/bench/dtls-handshakes-poll.py $B/poll.py
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
mosquitto -c device-sim/scenarios/bench/mosquitto.conf > $B/mosq.log 2>&1 &
MOSQ=$!
$T/mqtt-sn-sim registry --devices 1000 --client-id hs-%n --psk-identity hs-key-%n \
    --psk-derive bench-secret --publish 'bench/#' --subscribe 'bench/#' -o $B/devices.toml
cat device-sim/scenarios/bench/dtls-devices.toml >> $B/devices.toml
$T/mqtt-sn-gateway --udp 127.0.0.1:10000 --dtls 127.0.0.1:10001 --devices $B/devices.toml \
    --broker mqtt://127.0.0.1:18883 --metrics 127.0.0.1:9109 > $B/gw.log 2>&1 &
GW=$!
sleep 2
TCK=$(getconf CLK_TCK)
S=device-sim/scenarios/bench/dtls-handshakes-1000.toml
for round in 1 2 3 4 5; do
for variant in udp one derived; do
  case $variant in
    udp) args=(-g 127.0.0.1:10000) ;;
    one) args=(-g 127.0.0.1:10001 --psk-identity fleet --psk 0f0e0d0c0b0a09080706050403020100) ;;
    derived) args=(-g 127.0.0.1:10001 --client-id hs-%n --psk-identity hs-key-%n --psk-derive bench-secret) ;;
  esac
  c0=$(cpu $GW)
  if [ $variant != udp ]; then rm -f $B/ready; python3 $B/poll.py http://127.0.0.1:9109/metrics $GW 1000 $B/ready > $B/poll.out 2>&1 & POLL=$!; while [ ! -e $B/ready ]; do sleep 0.05; done; fi
  /usr/bin/time -f "sim %U+%S s" $T/mqtt-sn-sim run -Q -b mqtt://127.0.0.1:18883 --scenario $S --report $B/$variant.json "${args[@]}" > $B/$variant.txt 2> $B/$variant.err
  c1=$(cpu $GW)
  if [ $variant != udp ]; then wait $POLL; fi
  conn=$(python3 -c "import json;c=json.load(open('$B/$variant.json'))['total']['counts'];print(c['connected'],c['dtls_failed'],c['published'],c['arrived'])")
  echo "round $round $variant: connected/dtls_failed/published/arrived $conn; gateway CPU run $(echo "scale=2;($c1-$c0)/$TCK" | bc) s; $(tail -1 $B/$variant.err); $( [ $variant != udp ] && cat $B/poll.out)"
  sleep 3
done
done
kill $GW; sleep 1; kill $MOSQ
