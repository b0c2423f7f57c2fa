"""The control API of a real `kernel-bridge serve` (full site in a box) against what an attacker
would send it (issue 15), over its real Unix socket and its real TCP listener.

Shows:
- requests that used to end the daemon (an overflowing JSON number, invalid UTF-8 in a path or a
  header) get a 4xx naming the problem, and the daemon, with a live kernel, goes on;
- a sustained flood of 1000 idle TCP connections without a token, together with a local user
  ("nobody") holding hundreds of idle Unix connections, locks out neither the health checks, nor
  a kernelspec wrapper's requests on its kernel, nor the hub pushing a token over TCP.

KB_FLOOD_SECONDS sets how long the flood lasts (default 15; the note of issue 15 quotes 100).
Run: /usr/bin/python3 tests/integration/test_api_abuse.py   (needs root; exit 77 = skipped where
network namespaces cannot be made).
"""
import json
import os
import pwd
import resource
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kbtest import CHANNELS, PY, log, main  # noqa: E402
from fullsite import FullSite, free_port  # noqa: E402

HUB_TOKEN = "hub-" + os.urandom(24).hex()
FLOOD_SECONDS = float(os.environ.get("KB_FLOOD_SECONDS", "15"))
IDLE_TCP = 1000
IDLE_UNIX_NOBODY = 300


def read_all(sock, timeout=10):
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def status_and_body(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class ApiAbuse(unittest.TestCase):
    fs = None

    @classmethod
    def setUpClass(cls):
        port = free_port()
        cls.fs = FullSite(serve=False)
        try:
            cls._start(port)
        except BaseException:
            cls.fs.down()
            raise

    @classmethod
    def _start(cls, port):
        cls.fs.up()
        fs = cls.fs
        tokens = os.path.join(fs.dir, "api-tokens")
        fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{HUB_TOKEN} jupyterhub admin\n")
        cls.tcp_port = port
        fs.extra_api_toml = f'tcp = "127.0.0.1:{port}"\ntokens_file = "{tokens}"\n'
        fs.config_path = fs.write_config()
        os.chmod(fs.dir, 0o711)  # "nobody" must reach the socket (it is 0666, as deployed)
        fs.start_serve()
        fs.push_token("root")

    @classmethod
    def tearDownClass(cls):
        if cls.fs:
            cls.fs.down()

    # ---- helpers ------------------------------------------------------------------------------
    def raw(self, data, over_tcp, timeout=10):
        if over_tcp:
            s = self.fs.box.connect("hub", "127.0.0.1", self.tcp_port, timeout=timeout)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.fs.socket_path)
        try:
            s.sendall(data)
            return read_all(s, timeout)
        finally:
            s.close()

    def request(self, over_tcp, method, target, body=b"", headers=b"", timeout=10):
        text = (method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        if over_tcp:
            text += b"Authorization: Bearer " + HUB_TOKEN.encode() + b"\r\n"
            text += b"X-Kernel-Bridge-User: root\r\n" if b"X-Kernel-Bridge-User" not in headers else b""
        text += headers
        if body:
            text += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        return status_and_body(self.raw(text + b"\r\n" + body, over_tcp, timeout))

    def assert_alive(self):
        self.assertIsNone(self.fs.serve.poll(), "serve exited:\n" + self.fs.tail("serve.log"))
        status, body = self.fs.api("GET", "/v1/health")
        self.assertEqual(status, 200, body)

    def start_kernel(self):
        ports = set()
        while len(ports) < 5:
            ports.add(free_port())
        info = {"ip": "127.0.0.1", "transport": "tcp", "key": os.urandom(16).hex(),
                "signature_scheme": "hmac-sha256"}
        info.update({f"{ch}_port": p for ch, p in zip(CHANNELS, sorted(ports))})
        status, body = self.fs.api("POST", "/v1/kernels",
                                   {"site": self.fs.site_name, "connection": info})
        self.assertEqual(status, 201, body)
        kid = body["id"]
        deadline = time.time() + 120
        while body["state"] != "ready":
            self.assertLess(time.time(), deadline, f"kernel not ready: {body}")
            self.assertNotEqual(body["state"], "ended", body)
            status, body = self.fs.api("GET", f"/v1/kernels/{kid}?wait=5s&after={body['version']}")
        return kid

    # ---- the requests that ended the daemon -------------------------------------------------
    def test_crash_requests_are_refused_and_the_daemon_goes_on(self):
        kid = self.start_kernel()
        digits = b"9" * 5001
        cases = [
            ("POST", b"/v1/kernels", b"1e400", b"", 400),
            ("POST", b"/v1/kernels", b'{"site": "box", "resources": {"nodes": ' + digits + b"}}",
             b"", 400),
            ("GET", b"/v1/kernels/%ff", b"", b"", 404),
            ("DELETE", b"/v1/kernels/%c3%28", b"", b"", 404),
            ("GET", b"/v1/\xff\xfe", b"", b"", 404),
            ("GET", b"/v1/kernels/" + b"k" * 10000, b"", b"", 404),
            ("GET", b"/v1/kernels/" + kid.encode() + b"?wait=abc", b"", b"", 400),
        ]
        for over_tcp in (False, True):
            for method, target, body, headers, want in cases:
                with self.subTest(tcp=over_tcp, target=target[:40]):
                    status, answer = self.request(over_tcp, method, target, body, headers)
                    self.assertEqual(status, want, answer)
                    self.assertIn("error", answer)
        # A non-admin caller naming another user with bytes that are not UTF-8 (Unix: root is no
        # admin of this bridge).
        status, answer = self.request(False, "GET", b"/v1/kernels",
                                      headers=b"X-Kernel-Bridge-User: \xff\xfe\r\n")
        self.assertEqual(status, 403, answer)
        self.assertIn("\\xff\\xfe", answer["error"])
        self.assert_alive()
        status, view = self.fs.api("GET", f"/v1/kernels/{kid}")
        self.assertEqual(view["state"], "ready")
        logged = self.fs.tail("serve.log", 2_000_000)
        self.assertNotIn("internal error", logged)
        self.assertNotIn("k" * 200, logged)  # the 10 KB id is cut in the log
        self.assertEqual(self.fs.api("DELETE", f"/v1/kernels/{kid}")[0], 202)

    # ---- the idle-connection flood ------------------------------------------------------------
    def test_idle_flood_locks_out_no_one(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
        kid = self.start_kernel()
        stop = threading.Event()
        stats = {"opened": 0, "dropped": 0}

        def tcp_flood():
            # Keeps IDLE_TCP connections open, opening a new one for each the bridge drops.
            held = []
            while not stop.is_set() and stats["opened"] < 200000:
                while len(held) < IDLE_TCP and not stop.is_set():
                    try:
                        held.append(self.fs.box.connect("hub", "127.0.0.1", self.tcp_port, 2))
                        stats["opened"] += 1
                    except OSError:
                        time.sleep(0.01)
                alive = []
                for s in held:
                    s.setblocking(False)
                    try:
                        gone = s.recv(1) == b""
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        stats["dropped"] += 1
                        s.close()
                    else:
                        alive.append(s)
                held = alive
                time.sleep(0.05)
            for s in held:
                s.close()

        nobody = pwd.getpwnam("nobody")
        holder = subprocess.Popen(
            [PY, "-c", (
                "import socket, sys, time\n"
                f"held = []\nfor _ in range({IDLE_UNIX_NOBODY}):\n"
                "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                f"    s.connect({self.fs.socket_path!r})\n"
                "    held.append(s)\n"
                "print('held', flush=True)\nsys.stdin.read()\n")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)))
        self.assertEqual(holder.stdout.readline().strip(), b"held")
        flood = threading.Thread(target=tcp_flood, daemon=True)
        flood.start()
        probes = {"health": [], "wrapper": [], "hub over tcp": []}
        failures = []
        try:
            time.sleep(1.0)  # the flood is at full strength
            deadline = time.time() + FLOOD_SECONDS
            while time.time() < deadline:
                for name, call in (
                        ("health", lambda: self.fs.api("GET", "/v1/health", timeout=5)),
                        ("wrapper", lambda: self.fs.api(
                            "GET", f"/v1/kernels/{kid}?wait=1s", timeout=5)),
                        ("hub over tcp", lambda: self.request(
                            True, "PUT", b"/v1/users/root/credentials",
                            json.dumps({"token": self.fs.tokens["root"]}).encode(), timeout=5))):
                    t0 = time.time()
                    try:
                        status, body = call()
                    except OSError as e:
                        status, body = 0, repr(e)
                    probes[name].append(time.time() - t0)
                    if status != 200:
                        failures.append((name, status, str(body)[:200]))
                time.sleep(0.5)
        finally:
            stop.set()
            flood.join(30)
            holder.stdin.close()
            holder.wait(10)
        summary = ", ".join(f"{name} {len(t) - sum(1 for f in failures if f[0] == name)}/{len(t)} "
                            f"answered (max {max(t) * 1000:.0f} ms)" for name, t in probes.items())
        log(f"flood of {FLOOD_SECONDS:.0f} s: {IDLE_TCP} idle TCP connections without a token "
            f"(opened {stats['opened']}, dropped by the bridge {stats['dropped']}) and "
            f"{IDLE_UNIX_NOBODY} idle Unix connections of 'nobody': {summary}")
        self.assertEqual(failures, [])
        self.assertGreater(stats["dropped"], 0, "the flood never reached the limit")
        self.assert_alive()
        metrics = self.fs.api("GET", "/metrics")[1]
        self.assertIn("kb_api_connections_refused_total", metrics)
        self.assertEqual(self.fs.api("DELETE", f"/v1/kernels/{kid}")[0], 202)


if __name__ == "__main__":
    main()
