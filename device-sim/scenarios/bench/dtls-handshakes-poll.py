# Used by dtls-handshakes.sh. Polls the gateway's /metrics every 50 ms; prints when dtls_handshakes_ok first rose and
# when it reached the target, and the gateway's CPU (utime+stime) across.
import sys, time, urllib.request, os
url, pid, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tck = os.sysconf('SC_CLK_TCK')
def cpu():
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck
def metric(name):
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    for l in text.splitlines():
        if l.startswith(name + ' ') or l.startswith(name + '{'):
            return float(l.split()[-1])
    return 0.0
base = metric('mqttsn_dtls_handshakes_ok_total'); basef = metric('mqttsn_dtls_handshakes_failed_total')
busy0 = metric('mqttsn_dtls_handshakes_busy_total')
c0 = cpu(); first = None; deadline = time.time() + 60
open(sys.argv[4], 'w').write('ready')
while time.time() < deadline:
    n = metric('mqttsn_dtls_handshakes_ok_total') - base
    now = time.time()
    if n > 0 and first is None:
        first = now; cfirst = cpu()
    if n >= target:
        break
    time.sleep(0.05)
end = time.time(); c1 = cpu()
busy = metric('mqttsn_dtls_handshakes_busy_total') - busy0
failed = metric('mqttsn_dtls_handshakes_failed_total') - basef
span = end - first if first else float('nan')
print(f'handshakes {n:.0f} failed {failed:.0f} busy {busy:.0f}; first..last {span:.2f} s = {n/span:.0f}/s; gateway CPU during {c1-cfirst:.2f} s ({(c1-cfirst)/n*1000:.3f} ms each)')
