#!/usr/bin/env python3
"""The benchmark suite (run it through bench/run, as root).

Builds its own namespaces (TESTING.md): every number is measured in this run
against the kernel's own veth path between two namespaces, and printed as a
value and a ratio to that baseline. host-switch runs in a "host" namespace
that has only loopback; servers there listen on 127.0.0.1 and the guest
reaches them through the NAT as 192.168.127.254. Every load is bounded in
time. Nothing here asserts: results are for reading (and bench/RESULTS.md).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
HOST_ALIAS = "192.168.127.254"
GUEST_IP = "192.168.127.2"

SECONDS = 4
procs = []
namespaces = []
tmpdir = tempfile.mkdtemp(prefix="rdnet-bench-")


def sh(*args, check=True, capture=True, timeout=120):
    r = subprocess.run(args, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout if capture else ""


def ns_add(prefix):
    name = f"{prefix}{os.getpid()}x{len(namespaces)}"
    os.makedirs(f"/etc/netns/{name}", exist_ok=True)
    with open(f"/etc/netns/{name}/resolv.conf", "w") as f:
        f.write("nameserver 127.0.0.1\n")
    sh("ip", "netns", "add", name)
    namespaces.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def nsx(ns, *args, **kw):
    return sh("ip", "netns", "exec", ns, *args, **kw)


def spawn(ns, *args, log=None):
    out = open(os.path.join(tmpdir, log or f"p{len(procs)}.log"), "w")
    p = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out, stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cleanup():
    for p in reversed(procs):
        stop(p)
    for ns in reversed(namespaces):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    shutil.rmtree(tmpdir, ignore_errors=True)


def wait_for(cond, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def listening(ns, port):
    return bool(nsx(ns, "ss", "-Hltn", f"sport = :{port}", check=False).strip())


def iperf(client_ns, server, port, reverse=False, parallel=1, udp_rate=None):
    args = ["iperf3", "-c", server, "-p", str(port), "-t", str(SECONDS), "-J", "-P", str(parallel)]
    if reverse:
        args.append("-R")
    if udp_rate:
        args += ["-u", "-b", udp_rate, "-l", "1400"]
    out = nsx(client_ns, *args, check=False, timeout=SECONDS + 30)
    try:
        j = json.loads(out)
    except json.JSONDecodeError:
        return None
    end = j.get("end", {})
    if udp_rate:
        s = end.get("sum", {})
        return {"bps": s.get("bits_per_second", 0), "loss": s.get("lost_percent", 0), "bytes": s.get("bytes", 0)}
    s = end.get("sum_received", {})
    return {"bps": s.get("bits_per_second", 0), "bytes": s.get("bytes", 0)}


def tool(ns, *args, timeout=60):
    out = nsx(ns, os.path.join(REL, "rdnet-bench"), *args, check=False, timeout=timeout)
    try:
        return float(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def mem_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- worlds


class KernelWorld:
    """Two namespaces joined by a veth: the baseline."""

    def __init__(self, mtu):
        self.a = ns_add("bka")
        self.b = ns_add("bkb")
        va, vb = f"bv{os.getpid() % 10000}a{mtu % 100}", f"bv{os.getpid() % 10000}b{mtu % 100}"
        sh("ip", "link", "add", va, "netns", self.a, "mtu", str(mtu), "type", "veth", "peer", "name", vb,
           "netns", self.b, "mtu", str(mtu))
        nsx(self.a, "ip", "addr", "add", "10.77.0.1/24", "dev", va)
        nsx(self.b, "ip", "addr", "add", "10.77.0.2/24", "dev", vb)
        nsx(self.a, "ip", "link", "set", va, "up")
        nsx(self.b, "ip", "link", "set", vb, "up")
        self.client, self.server_ns, self.server_ip = self.a, self.b, "10.77.0.2"


class SwitchWorld:
    """host-switch in a loopback-only host namespace, vm-switch in a guest."""

    def __init__(self, mtu, forwards=()):
        self.h = ns_add("bhh")
        self.g = ns_add("bhg")
        sock = os.path.join(tmpdir, f"hs{mtu}.sock")
        args = [os.path.join(REL, "host-switch"), "--listen", f"unix://{sock}", "--mtu", str(mtu)]
        for f in forwards:
            args += ["-port-forward", f]
        self.hs = spawn(self.h, *args, log=f"host-switch-{mtu}.log")
        if not wait_for(lambda: os.path.exists(sock)):
            raise RuntimeError("host-switch did not start")
        self.vs = spawn(self.g, os.path.join(REL, "vm-switch"), "--connect", f"unix://{sock}", "--mtu", str(mtu),
                        "--resolv-conf", os.path.join(tmpdir, f"resolv{mtu}"), "-logfile",
                        os.path.join(tmpdir, f"vm-switch-{mtu}.log"))
        if not wait_for(lambda: "inet " in nsx(self.g, "ip", "-4", "addr", "show", "dev", "eth0", check=False), 30):
            raise RuntimeError("guest got no lease")

    def host_switch_pid(self):
        # `ip netns exec` execs the program, so the PID is host-switch's.
        return self.hs.pid


# ---------------------------------------------------------------- runs

rows = []


def row(name, value, unit, base=None, note=""):
    ratio = (value / base) if (value is not None and base) else None
    rows.append((name, value, unit, ratio, note))
    v = "n/a" if value is None else (f"{value / 1e9:.2f}" if unit == "Gbit/s" else f"{value:,.0f}")
    r = "" if ratio is None else f"{ratio:.2f}x"
    print(f"  {name:<48} {v:>10} {unit:<8} {r:>7} {note}", flush=True)


def gbps(res):
    return None if not res else res["bps"]


def tcp_rows(mtu, kernel, switch):
    k = KernelWorld(mtu)
    spawn(k.server_ns, "iperf3", "-s", "-B", k.server_ip, "-p", "5201")
    wait_for(lambda: listening(k.server_ns, 5201))
    kb = {
        "up": gbps(iperf(k.client, k.server_ip, 5201)),
        "down": gbps(iperf(k.client, k.server_ip, 5201, reverse=True)),
        "p4": gbps(iperf(k.client, k.server_ip, 5201, parallel=4)),
    }
    row(f"kernel veth TCP, MTU {mtu}", kb["up"], "Gbit/s", kb["up"], "baseline")
    kernel[mtu] = kb

    s = SwitchWorld(mtu, forwards=[f"127.0.0.1:15201={GUEST_IP}:5201"])
    spawn(s.h, "iperf3", "-s", "-B", "127.0.0.1", "-p", "5201")
    spawn(s.g, "iperf3", "-s", "-p", "5201")
    wait_for(lambda: listening(s.h, 5201) and listening(s.g, 5201))
    pid = s.host_switch_pid()
    c0 = cpu_seconds(pid)
    up = iperf(s.g, HOST_ALIAS, 5201)
    c1 = cpu_seconds(pid)
    row(f"host-switch TCP guest→host, MTU {mtu}", gbps(up), "Gbit/s", kb["up"])
    if up and up["bytes"]:
        row(f"host-switch CPU s/GB guest→host, MTU {mtu}", (c1 - c0) / (up["bytes"] / 1e9), "s/GB")
    row(f"host-switch TCP host→guest, MTU {mtu}", gbps(iperf(s.g, HOST_ALIAS, 5201, reverse=True)), "Gbit/s",
        kb["down"])
    row(f"host-switch TCP port-forward in, MTU {mtu}", gbps(iperf(s.h, "127.0.0.1", 15201)), "Gbit/s", kb["up"])
    row(f"host-switch TCP 4 streams guest→host, MTU {mtu}", gbps(iperf(s.g, HOST_ALIAS, 5201, parallel=4)),
        "Gbit/s", kb["p4"])
    switch[mtu] = s


def rr_rows(kernel_world, s):
    k = kernel_world
    spawn(k.server_ns, os.path.join(REL, "rdnet-bench"), "server", "--listen", f"{k.server_ip}:7000")
    spawn(s.h, os.path.join(REL, "rdnet-bench"), "server", "--listen", "127.0.0.1:7000")
    spawn(s.g, os.path.join(REL, "rdnet-bench"), "server", "--listen", "0.0.0.0:7000")
    wait_for(lambda: listening(k.server_ns, 7000) and listening(s.h, 7000) and listening(s.g, 7000))
    krr = tool(k.client, "rr", "--connect", f"{k.server_ip}:7000", "--seconds", str(SECONDS))
    row("kernel veth request/response (1 byte)", krr, "rt/s", krr, "baseline")
    row("host-switch request/response guest→host", tool(s.g, "rr", "--connect", f"{HOST_ALIAS}:7000", "--seconds",
                                                        str(SECONDS)), "rt/s", krr)
    row("host-switch request/response port-forward", tool(s.h, "rr", "--connect", "127.0.0.1:17000", "--seconds",
                                                           str(SECONDS)), "rt/s", krr)
    kcrr = tool(k.client, "crr", "--connect", f"{k.server_ip}:7000", "--seconds", str(SECONDS))
    row("kernel veth connection rate", kcrr, "conn/s", kcrr, "baseline")
    row("host-switch connection rate guest→host", tool(s.g, "crr", "--connect", f"{HOST_ALIAS}:7000", "--seconds",
                                                       str(SECONDS)), "conn/s", kcrr)
    row("host-switch connection rate port-forward", tool(s.h, "crr", "--connect", "127.0.0.1:17000", "--seconds",
                                                         str(SECONDS)), "conn/s", kcrr)


def udp_rows(k, s, rate="2G"):
    kr = iperf(k.client, k.server_ip, 5201, udp_rate=rate)
    row(f"kernel veth UDP at {rate}", gbps(kr), "Gbit/s", gbps(kr), f"loss {kr['loss']:.1f}%" if kr else "")
    sr = iperf(s.g, HOST_ALIAS, 5201, udp_rate=rate)
    row(f"host-switch UDP guest→host at {rate}", gbps(sr), "Gbit/s", gbps(kr), f"loss {sr['loss']:.1f}%" if sr else "")


def memory_rows(s):
    pid = s.host_switch_pid()
    row("host-switch RSS idle", mem_kib(pid, "VmRSS") / 1024, "MiB", None, "target ≤ 16 MiB")
    held = tool(s.g, "hold", "--connect", f"{HOST_ALIAS}:7000", "--count", "5000", "--hold", "2", timeout=180)
    row("host-switch peak RSS with 5000 connections", mem_kib(pid, "VmHWM") / 1024, "MiB", None,
        f"target ≤ 120 MiB; {held and int(held)} of 5000 echoed")


def other_rows(mtu, kernel):
    """slirp4netns and pasta, where installed, side by side."""
    kb = kernel.get(mtu)
    if shutil.which("slirp4netns"):
        h = ns_add("bsh")
        g = ns_add("bsg")
        spawn(h, "iperf3", "-s", "-B", "127.0.0.1", "-p", "5201")
        wait_for(lambda: listening(h, 5201))
        spawn(h, "slirp4netns", "--configure", f"--mtu={mtu}", "--netns-type=path", f"/run/netns/{g}", "tap0")
        if wait_for(lambda: "inet " in nsx(g, "ip", "-4", "addr", "show", "dev", "tap0", check=False), 10):
            row(f"slirp4netns TCP guest→host, MTU {mtu}", gbps(iperf(g, "10.0.2.2", 5201)), "Gbit/s",
                kb and kb["up"])
            row(f"slirp4netns TCP host→guest, MTU {mtu}", gbps(iperf(g, "10.0.2.2", 5201, reverse=True)), "Gbit/s",
                kb and kb["down"])
        else:
            row(f"slirp4netns TCP, MTU {mtu}", None, "Gbit/s", None, "did not come up")
    if shutil.which("pasta"):
        try:
            pasta_rows(mtu, kb)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row(f"pasta TCP, MTU {mtu}", None, "Gbit/s", None, f"could not set up: {e}"[:60])


def pasta_rows(mtu, kb):
    if True:
        h = ns_add("bph")
        g = ns_add("bpg")
        spawn(h, "iperf3", "-s", "-B", "127.0.0.1", "-p", "5201")
        wait_for(lambda: listening(h, 5201))
        # pasta copies the (loopback-only) host namespace's addressing; give it
        # a dummy route so it has something to copy, and map the host's
        # loopback to an address the guest can reach.
        nsx(h, "ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1")
        nsx(h, "ip", "addr", "add", "10.88.0.1/24", "dev", "dummy0")
        nsx(h, "ip", "link", "set", "dummy0", "up")
        nsx(h, "ip", "route", "add", "default", "via", "10.88.0.2", "dev", "dummy0")
        spawn(h, "pasta", "--config-net", "-m", str(mtu), "--map-host-loopback", "10.88.0.254", "-t", "none", "-u",
              "none", "-T", "none", "-U", "none", "--netns", f"/run/netns/{g}", "-f")
        if wait_for(lambda: "inet " in nsx(g, "ip", "-4", "addr", check=False).replace("127.0.0.1", ""), 10):
            row(f"pasta TCP guest→host, MTU {mtu}", gbps(iperf(g, "10.88.0.254", 5201)), "Gbit/s", kb and kb["up"])
            row(f"pasta TCP host→guest, MTU {mtu}", gbps(iperf(g, "10.88.0.254", 5201, reverse=True)), "Gbit/s",
                kb and kb["down"])
        else:
            row(f"pasta TCP, MTU {mtu}", None, "Gbit/s", None, "did not come up")


def main():
    global SECONDS
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=SECONDS)
    ap.add_argument("--quick", action="store_true", help="MTU 1500 only, no slirp4netns/pasta")
    a = ap.parse_args()
    SECONDS = a.seconds
    kernel, switch = {}, {}
    mtus = [1500] if a.quick else [1500, 65520]
    print(f"{'row':<50} {'value':>10} {'unit':<8} {'ratio':>7}")
    for mtu in mtus:
        tcp_rows(mtu, kernel, switch)
        if not a.quick:
            other_rows(mtu, kernel)
    s = switch[1500]
    # The forward for the rr/crr rows goes through the API of host-switch at 1500.
    k15 = KernelWorld(1500)
    spawn(k15.server_ns, "iperf3", "-s", "-B", k15.server_ip, "-p", "5201")
    wait_for(lambda: listening(k15.server_ns, 5201))
    api_forward(s)
    rr_rows(k15, s)
    udp_rows(k15, s)
    memory_rows(s)


def api_forward(s):
    """A second forward, for the rr/crr rows, exposed at start-up like the iperf one."""
    # host-switch was started with one -port-forward; add 17000 through the
    # inside API so both the static and the API path are exercised.
    body = json.dumps({"local": "127.0.0.1:17000", "remote": f"{GUEST_IP}:7000", "protocol": "tcp"})
    nsx(s.g, "curl", "-s", "-m", "5", "-X", "POST", "-d", body, "http://192.168.127.1/services/forwarder/expose",
        check=False)


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
