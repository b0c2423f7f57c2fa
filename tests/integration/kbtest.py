"""Shared pieces of the integration tests: the site in a box, agents, the standalone tunnel and
Jupyter clients, all real (OpenSSH sshd, ipykernel, jupyter_client from Debian's packages).

Run by /usr/bin/python3 (Debian's Jupyter packages live there). Tests that need isolated hosts
exit with status 77 when network namespaces cannot be made, which ctest reports as skipped.
"""
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SRC = os.environ.get("KB_SOURCE_DIR") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("KB_BINARY") or os.path.join(SRC, "build", "kernel-bridge")
PY = "/usr/bin/python3"
sys.path.insert(0, os.path.join(SRC, "tests", "sitebox"))

from sitebox import NeedsNetns, SiteBox  # noqa: E402

IPYKERNEL_ARGV = [PY, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
SKIP = 77


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def write_secret(path):
    """A fresh per-kernel link secret in the format `kernel-bridge agent` reads (64 hex, 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


def write_connection_file(path, ports=None, key=None, ip="127.0.0.1"):
    """A Jupyter connection file as KernelManager writes it. Ports 0 let the tunnel choose."""
    ports = ports or {}
    info = {
        "ip": ip,
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "key": key or os.urandom(16).hex(),
        "kernel_name": "python3",
    }
    for ch in CHANNELS:
        info[f"{ch}_port"] = ports.get(ch, 0)
    with open(path, "w") as f:
        json.dump(info, f)
    os.chmod(path, 0o600)
    return path


def ensure_user(name, home=None):
    """Creates a system user for a test if missing (with `home` made and owned by it, when given);
    returns True when it was created, so the test removes it again with `userdel`."""
    import pwd
    try:
        pwd.getpwnam(name)
        created = False
    except KeyError:
        argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if home:
            argv += ["--home-dir", home]
        subprocess.run(argv + [name], check=True, capture_output=True)
        created = True
    if home:
        os.makedirs(home, exist_ok=True)
        u = pwd.getpwnam(name)
        os.chown(home, u.pw_uid, u.pw_gid)
    return created


_CLONE_NEWNET = 0x40000000


def enter_host(site, host):
    """Moves this (still single-threaded) test process into `host`'s network namespace, so the
    Jupyter clients it creates connect from there. Processes started later inherit it; the site in
    a box reaches its hosts through absolute namespace paths, so it keeps working."""
    ns = site.info["hosts"][host]["ns"]
    if not ns:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Agent:
    """`kernel-bridge agent` started in the compute host, as the batch job would start it."""

    def __init__(self, site, workdir, kernel_argv=None, secret_file=None, extra=()):
        self.site = site
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.secret_file = secret_file or write_secret(os.path.join(workdir, "link.secret"))
        self.discovery = os.path.join(workdir, "kernel-bridge-agent.json")
        self.log_path = os.path.join(workdir, "agent.log")
        argv = [BIN, "agent", "--listen", f"{site.info['compute_addr']}:0",
                "--secret-file", self.secret_file, "--discovery-file", self.discovery,
                "--runtime-dir", os.path.join(workdir, "runtime"), *extra,
                "--", *(kernel_argv or IPYKERNEL_ARGV)]
        self._log = open(self.log_path, "wb")
        self.proc = site.popen("compute", argv, cwd=workdir, stdout=self._log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while not os.path.exists(self.discovery):
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if time.time() > deadline:
                raise AssertionError(f"agent wrote no discovery file in 30 s:\n{self.log()}")
            time.sleep(0.05)
        with open(self.discovery) as f:
            self.info = json.load(f)
        self.endpoint = f"{self.info['host']}:{self.info['port']}"

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class Tunnel:
    """`kernel-bridge tunnel` in the hub host: JSON events from its stdout, commands to its stdin."""

    def __init__(self, site, kernels, workdir, direct=False, extra=(), ssh_overrides=None,
                 host="hub"):
        """kernels: list of (connection_file, agent_endpoint, secret_file). `host` is where it runs
        (only --direct makes sense elsewhere: the login host reaches the agents without SSH)."""
        info = dict(site.info)
        info.update(ssh_overrides or {})
        argv = [BIN, "tunnel"]
        if direct:
            argv += ["--direct"]
        else:
            argv += ["--ssh-host", info["login_addr"], "--ssh-port", str(info["ssh_port"]),
                     "--ssh-user", info["ssh_user"], "--identity", info["identity"],
                     "--known-hosts", info["known_hosts"],
                     "--keepalive-interval", "1", "--keepalive-count", "3",
                     "--reconnect-max", "2"]
        argv += list(extra)
        if len(kernels) > 20:
            spec = os.path.join(workdir, "kernels.json")
            with open(spec, "w") as f:
                json.dump([{"connection_file": c, "agent": a, "secret_file": s}
                           for c, a, s in kernels], f)
            argv += ["--kernels-file", spec]
        else:
            for c, a, s in kernels:
                argv += ["--kernel", f"{c},{a},{s}"]
        self.log_path = os.path.join(workdir, "tunnel.log")
        self._log = open(self.log_path, "wb")
        self.events = []
        self._cond = threading.Condition()
        self.proc = site.popen(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=self._log, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.decode(errors="replace").strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "unparsable", "line": line}
            ev["_t"] = time.time()
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "_eof", "_t": time.time()})
            self._cond.notify_all()

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-8000:]
        except OSError:
            return ""

    def find(self, event, kernel=None, after=0):
        return [e for e in self.events[after:] if e.get("event") == event and
                (kernel is None or e.get("kernel") == kernel)]

    def wait_for(self, event, kernel=None, timeout=60, after=0, count=1):
        deadline = time.time() + timeout
        with self._cond:
            while True:
                found = self.find(event, kernel, after)
                if len(found) >= count:
                    return found[count - 1]
                if self.find("_eof"):
                    raise AssertionError(
                        f"tunnel exited (rc={self.proc.poll()}) while waiting for {event}:\n"
                        f"events={self.events[-10:]}\n{self.log()}")
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError(f"no '{event}' (kernel {kernel}) within {timeout} s; "
                                         f"events={self.events[-10:]}\n{self.log()}")
                self._cond.wait(min(left, 0.5))

    def command(self, line):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.command("quit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()


def blocking_client(connection_file):
    from jupyter_client import BlockingKernelClient
    kc = BlockingKernelClient(connection_file=connection_file)
    kc.load_connection_file()
    kc.start_channels()
    kc.hb_channel.unpause()  # HBChannel starts paused; KernelManager-less clients must unpause
    return kc


def wait_beating(kc, timeout=15):
    """True once jupyter_client's own HBChannel sees the kernel beating."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if kc.hb_channel.is_beating():
            return True
        time.sleep(0.2)
    return kc.hb_channel.is_beating()


def wait_kernel_info(kc, timeout=60):
    reply = kc.kernel_info(reply=True, timeout=timeout)
    assert reply["content"]["status"] == "ok", reply
    return reply


def collect_printed_numbers(kc, msg_id, numbers, seconds=60):
    """Appends to `numbers` every integer the cell `msg_id` prints on iopub, until the kernel is
    idle again or `seconds` pass (a numbered print loop across a restart)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            m = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "stream":
            numbers.extend(int(n) for n in m["content"]["text"].split())
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            return


def run_cell(kc, code, timeout=60, stdin_hook=None):
    """Executes `code`; returns (reply, stdout text, list of iopub messages)."""
    out, msgs = [], []

    def hook(msg):
        msgs.append(msg)
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    kwargs = {"output_hook": hook, "timeout": timeout}
    if stdin_hook is not None:
        kwargs.update(allow_stdin=True, stdin_hook=stdin_hook)
    reply = kc.execute_interactive(code, **kwargs)
    return reply, "".join(out), msgs


class SiteTestCase(unittest.TestCase):
    """Brings up one site in a box for the whole class; tears it down even when tests fail."""
    needs_netns = True
    site = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kb-it-")
        cls.site = SiteBox(state_dir=os.path.join(cls.tmp, "site"))
        cls.site.__enter__()
        if cls.needs_netns and not cls.site.netns:
            cls.site.__exit__(None, None, None)
            raise NeedsNetns("network namespaces are not available on this machine")
        enter_host(cls.site, "hub")

    @classmethod
    def tearDownClass(cls):
        if cls.site is not None:
            cls.site.__exit__(None, None, None)
        shutil.rmtree(cls.tmp, ignore_errors=True)


class OneKernelTestCase(SiteTestCase):
    """One real ipykernel behind an agent in compute and a `kernel-bridge tunnel` in hub (through
    sshd in login), with a connected BlockingKernelClient: cls.agent, cls.tunnel, cls.cf, cls.kc."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.agent = Agent(cls.site, os.path.join(cls.tmp, "k0"))
        cls.cf = write_connection_file(os.path.join(cls.tmp, "kernel-hub.json"))
        cls.tunnel = Tunnel(cls.site, [(cls.cf, cls.agent.endpoint, cls.agent.secret_file)],
                            cls.tmp)
        cls.tunnel.wait_for("listening", 0)
        cls.started = cls.tunnel.wait_for("kernel_started", 0, timeout=90)
        cls.kc = blocking_client(cls.cf)
        wait_kernel_info(cls.kc, timeout=90)

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "kc", None) is not None:
            cls.kc.stop_channels()
        for name in ("tunnel", "agent"):
            if getattr(cls, name, None) is not None:
                getattr(cls, name).stop()
        super().tearDownClass()


def main():
    """unittest main that maps 'no namespaces' to exit status 77 (ctest: skipped)."""
    try:
        prog = unittest.main(exit=False, verbosity=2)
    except NeedsNetns as e:
        print(f"SKIPPED: {e}", file=sys.stderr)
        sys.exit(SKIP)
    result = prog.result
    for _, err in result.errors:
        if "NeedsNetns" in err:
            print("SKIPPED: network namespaces are not available", file=sys.stderr)
            sys.exit(SKIP)
    if (result.wasSuccessful() and result.skipped
            and result.testsRun <= len(result.skipped)):
        # Nothing ran (e.g. a missing package or no root): ctest shows "skipped", not "passed".
        print("SKIPPED: " + "; ".join(reason for _, reason in result.skipped), file=sys.stderr)
        sys.exit(SKIP)
    sys.exit(0 if result.wasSuccessful() else 1)


__all__ = [n for n in dir() if not n.startswith("_")] + ["re", "queue"]
