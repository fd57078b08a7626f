#!/usr/bin/env python3
"""QoS 0 load at a fixed total rate from N MQTT-SN devices, for CPU-per-message figures.

Each device is its own UDP socket: it CONNECTs (clean session, keep-alive 300 s), then all
of them together send TOTAL QoS 0 PUBLISHes to the short topic "ld" at RATE per second,
round robin, and DISCONNECT. The same total rate from 1 or from 100 devices is what the
"100 devices within 1.5x of one device" target compares (docs/benchmarks.md).

    scripts/qos0-load.py HOST:PORT DEVICES TOTAL RATE
"""
import socket
import sys
import time


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    gw = (host, int(port))
    n, total, rate = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.connect(gw)
        s.settimeout(10)
        cid = f"load-{n}-{i}".encode()
        # CONNECT: length, 0x04, flags (clean session), protocol id 1, duration 300 s.
        s.send(bytes([6 + len(cid), 0x04, 0x04, 0x01, 0x01, 0x2C]) + cid)
        ack = s.recv(64)
        if len(ack) < 3 or ack[1] != 0x05 or ack[2] != 0:
            sys.exit(f"device {i}: no CONNACK accepted: {ack!r}")
        socks.append(s)
    payload = b"x" * 16
    # PUBLISH: length, 0x0C, flags (QoS 0, short topic), topic "ld", msg id 0, data.
    packet = bytes([7 + len(payload), 0x0C, 0x02]) + b"ld" + b"\x00\x00" + payload
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            socks[sent % n].send(packet)
            sent += 1
        time.sleep(0.0005)
    took = time.perf_counter() - start
    for s in socks:
        s.send(bytes([2, 0x18]))
    print(f"{sent} publishes from {n} devices in {took:.2f} s ({sent / took:.0f}/s)")


if __name__ == "__main__":
    main()
