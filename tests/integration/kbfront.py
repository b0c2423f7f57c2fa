"""The Jupyter front door on the full site: `kernel-bridge kernelspec install` into a temporary
Jupyter path, jupyter_client KernelManagers using it (the wrapper is what Jupyter launches), and
the wrapper run by hand. Shared by tests/integration/test_jupyter_*.py, bench/lifecycle and
scripts/demo. Run by /usr/bin/python3.
"""
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kbtest  # noqa: E402
from fullsite import BIN, FullSite  # noqa: E402

LIVE = ("requested", "submitted", "queued", "starting", "connecting", "ready", "reconnecting")


def log(*args):
    kbtest.log(*args)


class FrontSite(FullSite):
    """FullSite + a temporary Jupyter data dir on JUPYTER_PATH, with kernelspecs made by
    `kernel-bridge kernelspec install`. The test's own process joins the hub host (so Jupyter
    clients connect to the bridge's endpoints there): call enter_hub() before starting threads."""

    def up(self):
        super().up()
        self.jupyter_dir = os.path.join(self.dir, "jupyter")
        self.runtime_dir = os.path.join(self.dir, "jupyter-runtime")
        os.makedirs(self.jupyter_dir, exist_ok=True)
        os.makedirs(self.runtime_dir, exist_ok=True)
        # jupyter_client reads these when a KernelSpecManager / connection file is made.
        os.environ["JUPYTER_PATH"] = self.jupyter_dir
        os.environ["JUPYTER_RUNTIME_DIR"] = self.runtime_dir
        os.environ["KERNEL_BRIDGE_SOCKET"] = self.socket_path

    def enter_hub(self):
        kbtest.enter_host(self.box, "hub")

    def install_kernelspec(self, name, *args, site=None):
        argv = [BIN, "kernelspec", "install", "--jupyter-path", self.jupyter_dir,
                "--name", name, "--site", site or self.site_name, "--socket", self.socket_path,
                *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"kernelspec install failed ({r.returncode}): {r.stderr}")
        with open(os.path.join(self.jupyter_dir, "kernels", name, "kernel.json")) as f:
            return json.load(f)

    # ---- the control API as the test's user ---------------------------------------------------
    def kernels(self):
        status, body = self.api("GET", "/v1/kernels")
        assert status == 200, (status, body)
        return body["kernels"]

    def live_kernels(self):
        return [k for k in self.kernels() if k["state"] in LIVE]

    def kernel(self, kid):
        status, body = self.api("GET", f"/v1/kernels/{kid}")
        assert status == 200, (status, body)
        return body

    def wait_kernel(self, predicate, timeout=120, what="a kernel"):
        """Polls the API until predicate(kernel view) holds for one of the caller's kernels."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            for k in self.kernels():
                if predicate(k):
                    return k
                last = k
            time.sleep(0.2)
        raise AssertionError(f"{what} not seen within {timeout} s; last: "
                             f"{json.dumps(last)[:1500] if last else None}\n{self.tail('serve.log')}")

    def stop_all(self, timeout=60):
        """DELETE every live kernel of ours and wait until they ended (test cleanup)."""
        for k in self.live_kernels():
            self.api("DELETE", f"/v1/kernels/{k['id']}")
        deadline = time.time() + timeout
        while self.live_kernels() and time.time() < deadline:
            time.sleep(0.3)

    def hold_queue(self, seconds):
        """The test site keeps jobs QUEUED this long (3600: until released with 0)."""
        self.control("POST", "/faults", {"queue_delay": seconds})

    def wait_nothing_running(self, timeout=60):
        """No live kernel of ours, no active UNICORE job, no process in the compute host."""
        deadline = time.time() + timeout
        while True:
            live = self.live_kernels()
            jobs = [j for j in self.unicore_jobs() if j.get("alive") or
                    j.get("status") in ("READY", "QUEUED", "RUNNING", "STAGINGIN")]
            pids = self.compute_pids()
            if not live and not jobs and not pids:
                return
            if time.time() > deadline:
                procs = subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(map(str, pids))],
                                       capture_output=True, text=True).stdout if pids else ""
                raise AssertionError(
                    f"left running after {timeout} s: kernels {[k['id'] + ':' + k['state'] for k in live]}, "
                    f"jobs {[(j['id'], j['status']) for j in jobs]}, compute processes:\n{procs}")
            time.sleep(0.5)


class FrontSiteCase(unittest.TestCase):
    """A test class on one FrontSite (built with `site_args`) for all its tests, entered into the
    hub host; skipped (NeedsNetns) where network namespaces cannot be made. Subclasses extend
    setUpClass for their own set-up after calling this one."""
    site_args = {}
    fs = None

    @classmethod
    def setUpClass(cls):
        cls.fs = FrontSite(**cls.site_args)
        cls.fs.__enter__()
        if not cls.fs.box.netns:
            cls.fs.__exit__(None, None, None)
            cls.fs = None
            raise kbtest.NeedsNetns("network namespaces are not available on this machine")
        cls.fs.enter_hub()

    @classmethod
    def tearDownClass(cls):
        if cls.fs is not None:
            cls.fs.__exit__(None, None, None)


class Wrapper:
    """`kernel-bridge kernel` started by hand (as Jupyter's local provisioner would), with its
    stderr captured; optionally as another Unix user (runuser)."""

    def __init__(self, fs, connection_file, *args, user=None, site=None, env=None):
        self.path = tempfile.mktemp(prefix="wrapper-", suffix=".log", dir=fs.dir)
        self._log = open(self.path, "wb")
        argv = [BIN, "kernel", "--socket", fs.socket_path, "--site", site or fs.site_name,
                *args, connection_file]
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def stderr(self):
        with open(self.path, errors="replace") as f:
            return f.read()

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the wrapper did not exit within {timeout} s:\n{self.stderr()}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def kernel_manager(name, stderr_path):
    """A jupyter_client KernelManager for kernelspec `name`; the wrapper's stderr goes to a file."""
    from jupyter_client import KernelManager
    km = KernelManager(kernel_name=name)
    km._kb_stderr_path = stderr_path
    km._kb_stderr = open(stderr_path, "ab")
    return km


def shut_down_all(kms, now=False):
    """Test cleanup: shuts down every kernel manager's kernel that still runs and closes its
    wrapper log; a failure is logged and the next one goes on."""
    for km in kms:
        try:
            if km.has_kernel:
                km.shutdown_kernel(now=now)
        except Exception as e:  # noqa: BLE001 (cleanup must go on)
            log("cleanup:", e)
        km._kb_stderr.close()


def start(km):
    km.start_kernel(stderr=km._kb_stderr, stdout=km._kb_stderr)


def wrapper_process(km):
    """The wrapper's Popen (jupyter_client 7: the local provisioner's process)."""
    return km.provisioner.process


def stderr_of(km):
    with open(km._kb_stderr_path, errors="replace") as f:
        return f.read()


def nudge(kc, timeout=60):
    """What jupyter_server does after a (re)start: kernel_info requests until one's iopub status
    message arrives, i.e. until the iopub subscription has reached the (new) kernel. A SUB socket
    that (re)connects does not get messages published before its subscription arrived."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg_id = kc.kernel_info()
        until = time.time() + 0.5
        while time.time() < until:
            try:
                m = kc.get_iopub_msg(timeout=max(0.01, until - time.time()))
            except queue.Empty:
                break
            if m["parent_header"].get("msg_id") == msg_id:
                # drain the rest of this request's shell reply
                return
    raise AssertionError(f"no iopub message from the kernel within {timeout} s")


def ready_client(km, timeout=120):
    kc = km.client()
    kc.start_channels()
    kbtest.wait_kernel_info(kc, timeout=timeout)
    nudge(kc)
    return kc


__all__ = ["FrontSite", "Wrapper", "kernel_manager", "start", "wrapper_process", "stderr_of",
           "ready_client", "nudge", "LIVE", "log", "BIN"]
