"""Measuring client for bench/tunnel, run inside one host of the site in a box by /usr/bin/python3.
Prints one JSON object. Modes:
  rtt CONNECTION_FILE N      kernel_info round trips (jupyter_client BlockingKernelClient)
  hb CONNECTION_FILE N       heartbeat REQ/echo round trips (raw pyzmq, like HBChannel)
  flood CONNECTION_FILE S    keeps iopub busy for S seconds (prints 1 KiB lines) and consumes it
"""
import json
import statistics
import sys
import time


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def client(cf):
    from jupyter_client import BlockingKernelClient
    kc = BlockingKernelClient(connection_file=cf)
    kc.load_connection_file()
    kc.start_channels(hb=False)
    kc.kernel_info(reply=True, timeout=120)
    return kc


def rtt(cf, n):
    kc = client(cf)
    for _ in range(20):
        kc.kernel_info(reply=True, timeout=30)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        kc.kernel_info(reply=True, timeout=30)
        samples.append((time.perf_counter() - t0) * 1e6)
    kc.stop_channels()
    return {"n": n, "p50_us": statistics.median(samples), "p99_us": pct(samples, 99)}


def hb(cf, n):
    import zmq
    info = json.load(open(cf))
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{info['ip']}:{info['hb_port']}")
    samples = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        s.send(b"ping")
        if not s.poll(10000):
            raise SystemExit("heartbeat: no echo within 10 s")
        s.recv()
        if i >= 10:
            samples.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.01)
    s.close()
    return {"n": n, "p50_ms": statistics.median(samples), "p99_ms": pct(samples, 99),
            "max_ms": max(samples)}


def flood(cf, seconds):
    kc = client(cf)
    code = ("import time\nend = time.time() + %f\nline = 'x' * 1023\nn = 0\n"
            "while time.time() < end:\n    print(line)\n    n += 1\nn" % seconds)
    msg_id = kc.execute(code)
    got = 0
    while True:
        msg = kc.get_iopub_msg(timeout=seconds + 120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            got += len(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    kc.stop_channels()
    return {"iopub_bytes": got, "iopub_mib_s": got / seconds / 2**20}


if __name__ == "__main__":
    mode, cf, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    fn = {"rtt": rtt, "hb": hb}.get(mode)
    if mode == "flood":
        print(json.dumps(flood(cf, float(arg))), flush=True)
    elif fn:
        print(json.dumps(fn(cf, int(arg))), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
