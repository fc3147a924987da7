"""Weight-sync throughput over the links a learner -> rollout sync can take, each against a
baseline timed in the same run:

  --part node   same node: a plain tensor copy of the same bytes vs (a) the gloo
                WeightTransport between two processes and (b) the shared-memory file
                (comm/shm_weights.py): writer process writes, reader process reads and copies
                every tensor into a preallocated destination, as an engine load does.
  --part veth   two network namespaces joined by a veth pair (needs root): a raw TCP socket
                copy (sendall / recv_into a preallocated bytearray) vs the gloo WeightTransport,
                sender in one namespace, receiver in the other.

Every measurement is end to end: from the sender starting until the receiver says it holds
every byte in its own destination. Best of --repeats after one warm-up round.

    .venv/bin/python bench/weight_sync_links.py [--part node veth] [--mb 256] [--bucket-mb 64 256]
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# Idle OpenMP threads of one process spin for a while after each parallel copy; with sender and
# receiver on one 2-core machine that spinning steals the other side's cores (it halved the
# shared-memory write here). Set before torch loads; spawned and namespaced children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402


def keep_freed_memory() -> None:
    """--keep-freed-memory (in every process of the run: children see the variable): glibc serves
    blocks up to 1 GiB from its heap (M_MMAP_THRESHOLD) and keeps freed heap memory mapped
    (M_TRIM_THRESHOLD), so a buffer allocated per bucket reuses pages instead of faulting new ones."""
    import ctypes

    os.environ["BENCH_KEEP_FREED_MEMORY"] = "1"
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)
    libc.mallopt(-1, 1 << 31)


if os.environ.get("BENCH_KEEP_FREED_MEMORY") == "1":
    keep_freed_memory()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comm.shm_weights import SharedMemoryWeightReader, SharedMemoryWeightWriter  # noqa: E402
from comm.transport import WeightTransport, free_port  # noqa: E402

SENDER_IP, RECEIVER_IP = "10.231.7.1", "10.231.7.2"
RAW_PORT, STORE_PORT = 29531, 29532  # inside fresh namespaces nothing else holds them


def metas_for(total_mb: int, n: int = 48):
    """(metas, bytes) of `n` float32 tensors of `total_mb` MB in all (a flattened parameter walk)."""
    per = total_mb * (1 << 20) // 4 // n
    return [(f"layer{i}.weight", (per,), "float32") for i in range(n)], per * 4 * n


def weights_of(metas):
    return {name: torch.full(shape, float(i)) for i, (name, shape, _) in enumerate(metas)}


def destinations(metas):
    """What a receiving engine holds: one preallocated tensor per name."""
    return {name: torch.empty(shape) for name, shape, _ in metas}


def best_of(rounds, fn):
    """(warm-up seconds, best seconds over `rounds`) of fn()."""
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:])


def line(what: str, nbytes: int, seconds: float, base: float = None, base_name: str = "") -> str:
    text = f"{what}: {nbytes / 1e6:.0f} MB in {seconds:.3f}s = {nbytes / 1e9 / seconds:.2f} GB/s"
    if base:
        text += f"; {base / seconds:.2f}x the {base_name} ({nbytes / 1e9 / base:.2f} GB/s)"
    return text


def goal(what: str, ratio: float, want: float) -> str:
    return f"goal {what} >= {want} x: {ratio:.2f} -> {'met' if ratio >= want else 'NOT met'}"


# ---- same node --------------------------------------------------------------------------------
def gloo_receiver(port, metas, rounds, host, local_host, ack):
    """Receive `rounds` broadcasts, load each into preallocated tensors, call ack() after each."""
    transport = WeightTransport(host, port, 1, 2, backend="gloo", local_host=local_host)
    dst = destinations(metas)
    for _ in range(rounds):
        _, stream = transport.receive()
        for name, t in stream:
            dst[name].copy_(t)
        del t  # as an engine's loader returns: the last piece is let go before the next receive
        ack()
    transport.close()


def gloo_node_receiver(port, metas, rounds, conn):
    gloo_receiver(port, metas, rounds, "127.0.0.1", None, lambda: conn.send(True))


def shm_reader(folder, metas, conn):
    """Read each version the writer names on `conn` and load it; answer the read's seconds."""
    reader, dst = SharedMemoryWeightReader(folder), destinations(metas)
    conn.send("ready")
    while (version := conn.recv()) is not None:
        t0 = time.perf_counter()
        _, views = reader.read(expected_version=version)
        for name, t in views:
            dst[name].copy_(t)
        conn.send(time.perf_counter() - t0)


def part_node(args) -> None:
    ctx = mp.get_context("spawn")
    for mb in args.mb:
        metas, nbytes = metas_for(mb)
        weights, dst = weights_of(metas), destinations(metas)
        _, copy_s = best_of(args.repeats, lambda: [dst[k].copy_(v) for k, v in weights.items()])
        print(line("node plain copy (copy_ into preallocated)", nbytes, copy_s), flush=True)

        for bucket_mb in args.bucket_mb:
            port, (here, there) = free_port(), ctx.Pipe()
            proc = ctx.Process(target=gloo_node_receiver, args=(port, metas, args.repeats + 1, there))
            proc.start()
            try:
                transport = WeightTransport("127.0.0.1", port, 0, 2, backend="gloo")
                versions = iter(range(10**9))
                _, gloo_s = best_of(args.repeats, lambda: (transport.send(
                    metas, weights.values(), next(versions), bucket_mb << 20), here.recv()))
                print(line(f"node gloo WeightTransport, buckets {bucket_mb} MB", nbytes, gloo_s, copy_s,
                           "plain copy"), flush=True)
            finally:
                proc.join(timeout=60)
                proc.kill()

        folder = tempfile.mkdtemp(prefix="realsr-r1-bench-", dir="/dev/shm")
        here, there = ctx.Pipe()
        proc = ctx.Process(target=shm_reader, args=(folder, metas, there))
        proc.start()
        try:
            writer, reads, writes, versions = SharedMemoryWeightWriter(folder), [], [], iter(range(10**9))
            here.recv()  # the reader has started (its imports are not the first sync's time)

            def sync():
                version = next(versions)
                writes.append(writer.write(metas, weights.values(), version).seconds)
                here.send(version)
                reads.append(here.recv())
            cold_s, shm_s = best_of(args.repeats, sync)
            here.send(None)
            for what, seconds in (("first sync (allocate + map + fault in)", cold_s), ("write only", min(writes[1:])),
                                  ("read + load only", min(reads[1:])), ("end to end (write, then read + load)", shm_s)):
                print(line(f"node shared memory, {what}", nbytes, seconds, copy_s, "plain copy"))
            print(goal("shared memory end to end / plain copy", copy_s / shm_s, 0.5), flush=True)
        finally:
            proc.join(timeout=60)
            proc.kill()
            shutil.rmtree(folder, ignore_errors=True)


# ---- two namespaces over veth -----------------------------------------------------------------
def connect(host: str, port: int, timeout_s: float = 60.0) -> socket.socket:
    """A TCP connection to a server that may not listen yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout_s)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def role_veth_sender(args) -> None:
    """In the sender namespace: raw socket rounds, then gloo rounds; prints JSON results."""
    metas, nbytes = metas_for(args.mb[0])
    weights = weights_of(metas)
    flat = torch.cat([v.reshape(-1) for v in weights.values()]).view(torch.uint8)
    payload = memoryview(flat.numpy())
    ctrl = connect(RECEIVER_IP, RAW_PORT)
    ctrl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _, raw_s = best_of(args.repeats, lambda: (ctrl.sendall(payload), ctrl.recv(1)))
    print(json.dumps({"what": "raw TCP socket (sendall / recv_into)", "bytes": nbytes, "seconds": raw_s}), flush=True)
    for bucket_mb in args.bucket_mb:
        port = STORE_PORT + bucket_mb  # a fresh store per group
        transport = WeightTransport(SENDER_IP, port, 0, 2, backend="gloo", local_host=SENDER_IP)
        versions = iter(range(10**9))
        _, gloo_s = best_of(args.repeats, lambda: (transport.send(
            metas, weights.values(), next(versions), bucket_mb << 20), ctrl.recv(1)))
        print(json.dumps({"what": f"gloo WeightTransport, buckets {bucket_mb} MB", "bytes": nbytes,
                          "seconds": gloo_s}), flush=True)
        transport.close()


def role_veth_receiver(args) -> None:
    """In the receiver namespace: the other end of role_veth_sender, acking every round."""
    metas, nbytes = metas_for(args.mb[0])
    server = socket.create_server((RECEIVER_IP, RAW_PORT))
    ctrl, _ = server.accept()
    ctrl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(nbytes))
    for _ in range(args.repeats + 1):
        got = 0
        while got < nbytes:
            n = ctrl.recv_into(buf[got:], nbytes - got)
            if n == 0:
                raise ConnectionError("sender closed the raw socket early")
            got += n
        ctrl.sendall(b"k")
    for bucket_mb in args.bucket_mb:
        gloo_receiver(STORE_PORT + bucket_mb, metas, args.repeats + 1, SENDER_IP, RECEIVER_IP,
                      lambda: ctrl.sendall(b"k"))  # acks travel over the raw socket


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def part_veth(args) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        sys.exit("--part veth needs root and iproute2's `ip` (it creates two network namespaces); skipped")
    suffix = str(os.getpid())
    ns_send, ns_recv = f"rsr1-send-{suffix}", f"rsr1-recv-{suffix}"
    procs = []
    try:
        sh("ip", "netns", "add", ns_send)
        sh("ip", "netns", "add", ns_recv)
        dev_send, dev_recv = f"rsr1s{suffix}"[:15], f"rsr1r{suffix}"[:15]
        sh("ip", "link", "add", dev_send, "netns", ns_send, "type", "veth", "peer", "name", dev_recv, "netns", ns_recv)
        for ns, dev, ip in ((ns_send, dev_send, SENDER_IP), (ns_recv, dev_recv, RECEIVER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(args.mtu), "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        common = ["--mb", str(args.mb[0]), "--repeats", str(args.repeats), "--bucket-mb", *map(str, args.bucket_mb)]
        for ns, role in ((ns_recv, "veth-receiver"), (ns_send, "veth-sender")):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                                           "--role", role, *common], stdout=subprocess.PIPE, text=True))
        out, _ = procs[1].communicate(timeout=args.timeout_s)
        procs[0].wait(timeout=60)
        if procs[1].returncode or procs[0].returncode:
            sys.exit(f"veth run failed: sender rc {procs[1].returncode}, receiver rc {procs[0].returncode}")
        raw, *results = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        print(line(f"veth (MTU {args.mtu}) {raw['what']}", raw["bytes"], raw["seconds"]))
        for r in results:
            print(line(f"veth (MTU {args.mtu}) {r['what']}", r["bytes"], r["seconds"], raw["seconds"], "raw socket"))
            print(goal(f"{r['what']} / raw socket", raw["seconds"] / r["seconds"], 0.5), flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by the pid we started (`ip netns exec` execs the python process)
                p.wait()
        for ns in (ns_send, ns_recv):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=["node", "veth"], default=["node", "veth"])
    ap.add_argument("--mb", type=int, nargs="+", default=[256], help="weight sizes (veth uses the first)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[256], help="gloo bucket sizes to try")
    ap.add_argument("--mtu", type=int, default=1500, help="veth MTU (1500: a plain Ethernet link)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed buffers (gloo's per-bucket allocations then fault no new pages)")
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--role", choices=["veth-sender", "veth-receiver"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.role:
        (role_veth_sender if args.role == "veth-sender" else role_veth_receiver)(args)
        return
    print(f"settings: {args.mb} MB in 48 float32 tensors, best of {args.repeats} after a warm-up, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, torch threads {torch.get_num_threads()}, "
          f"keep-freed-memory {'on' if args.keep_freed_memory else 'off'}", flush=True)
    if "node" in args.part:
        part_node(args)
    if "veth" in args.part:
        part_veth(args)


if __name__ == "__main__":
    main()
