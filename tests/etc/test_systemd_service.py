"""etc/kernel-bridge.service under a real systemd: a container booted with systemd-nspawn from this
machine's own file system (a read-only view of `/` under a throw-away overlay, loopback network
only), into which the operator's steps of docs/operations.md are applied: a `kernel-bridge` system
user, /usr/local/bin/kernel-bridge, etc/kernel-bridge.toml as shipped in /etc/kernel-bridge with an
SSH key and a known_hosts file, the unit in /etc/systemd/system.

Shows: the unit starts the daemon with all its hardening (ProtectSystem=strict, PrivateTmp,
MemoryDenyWriteExecute, RestrictAddressFamilies, ...) as the `kernel-bridge` user; systemd makes
the socket and state directories with the modes the daemon needs; root's `kernel-bridge list` and
the control API answer on /run/kernel-bridge/api.sock; a kernel request reaches the UNICORE client
and ends with a reason that names the unreachable site (the container has no network); `systemctl
reload` re-reads the tokens; `systemctl stop` ends the daemon cleanly (inactive, not failed); a
broken configuration makes the unit fail with the config error in the journal, and fixing the file
lets it start again. Everything the daemon logs is in the journal. And the whole path under the
sandbox: with OpenSSH and the UNICORE test site on loopback addresses inside the container
(tests/etc/systemd_site.py), a kernel Jupyter starts through a kernelspec runs a cell and its job
ends at shutdown.

Run: /usr/bin/python3 tests/etc/test_systemd_service.py   (needs root; exit 77 = skipped where
systemd-nspawn is not installed or cannot boot a container here).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
import kbtest  # noqa: E402
from sitebox import descendants  # noqa: E402

BIN = os.path.abspath(kbtest.BIN)
ETC = os.path.join(kbtest.SRC, "etc")
UNIT = "kernel-bridge.service"

API_CLIENT = r"""
import json, sys, time
sys.path.insert(0, "/mnt/kb/tests/integration")
from fullsite import UnixHTTPConnection, exchange
def call(method, path, body=None):
    return exchange(UnixHTTPConnection("/run/kernel-bridge/api.sock", timeout=30), method, path,
                    body=body)
out = {"health": call("GET", "/v1/health")}
out["push"] = call("PUT", "/v1/users/root/credentials", {"token": "t" * 40})
ports = {ch + "_port": 41000 + i for i, ch in enumerate(("shell", "iopub", "stdin", "control", "hb"))}
status, kernel = call("POST", "/v1/kernels", {"site": "demo", "connection": dict(
    ip="127.0.0.1", transport="tcp", key="k" * 32, signature_scheme="hmac-sha256", **ports)})
out["create"] = [status, kernel]
deadline = time.time() + 90
while status == 201 and time.time() < deadline:
    _, view = call("GET", "/v1/kernels/" + kernel["id"])
    out["ended"] = view
    if view["state"] == "ended":
        break
    time.sleep(0.3)
print(json.dumps(out))
"""


class Container:
    """A systemd container booted from this machine's root file system (changes stay in a tmpfs)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.name = f"kbsd{os.getpid()}"
        self.view = os.path.join(tmp, "root")
        os.makedirs(self.view)
        self.log_path = os.path.join(tmp, "boot.log")
        self._log = open(self.log_path, "wb")
        # The bind mount of / lives in a private mount namespace: it goes away with nspawn.
        script = (f'mount --bind / "{self.view}" && exec systemd-nspawn -q -D "{self.view}" '
                  f'--volatile=overlay --register=no --keep-unit --link-journal=no '
                  f'--private-network --machine={self.name} '
                  f'--bind-ro="{BIN}":/usr/local/bin/kernel-bridge --bind-ro="{kbtest.SRC}":/mnt/kb '
                  f'-b systemd.unit=basic.target')
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.init_pid = None
        try:
            self._wait_booted()
        except BaseException:
            self.stop()
            raise

    def _wait_booted(self):
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise unittest.SkipTest(f"systemd-nspawn cannot boot a container here "
                                        f"(exit {self.proc.returncode}): {self.boot_log()[-1500:]}")
            self.init_pid = self.init_pid or self._find_init()
            if self.init_pid:
                r = self.run(["systemctl", "is-system-running"], check=False)
                if r.stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise AssertionError("the container's systemd did not reach basic.target in 90 s:\n"
                             + self.boot_log()[-3000:])

    def _find_init(self):
        """The container's PID 1: the first systemd process below our systemd-nspawn (a parent
        comes before the children it forks)."""
        for pid in descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].endswith(b"/systemd"):
                        return pid
            except OSError:
                continue
        return None

    def boot_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def run(self, argv, check=True, input=None, timeout=120):
        # Inside, the source tree and the binary are where they are bound in, whatever this
        # process's KB_SOURCE_DIR / KB_BINARY say (a clone under /tmp is not visible there).
        r = subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", "env",
                            "KB_SOURCE_DIR=/mnt/kb", "KB_BINARY=/usr/local/bin/kernel-bridge", *argv],
                           input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(argv)} exited {r.returncode}:\n"
                                 f"{r.stdout}{r.stderr}")
        return r

    def sh(self, script, check=True):
        return self.run(["sh", "-ec", script], check=check)

    def journal(self, since=None):
        """The unit's journal (messages only), from `since` (Unix seconds) on."""
        argv = ["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"]
        if since is not None:
            argv += ["--since", "@%d" % int(since)]
        return self.run(argv).stdout

    def stop(self):
        if self.proc.poll() is None and self.init_pid:
            self.run(["systemctl", "poweroff"], check=False, timeout=30)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self._log.close()


class SystemdService(unittest.TestCase):
    c = None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to boot a container")
        if not shutil.which("systemd-nspawn"):
            raise unittest.SkipTest("systemd-nspawn is not installed (package systemd-container)")
        # A missing bind source would make systemd-nspawn exit, which would read as "cannot boot".
        for path in (BIN, os.path.join(ETC, "kernel-bridge.service"), os.path.join(ETC, "kernel-bridge.toml")):
            if not os.path.exists(path):
                raise AssertionError(f"{path} is missing (run scripts/build)")
        cls.tmp = tempfile.mkdtemp(prefix="kb-systemd-")
        try:
            cls.c = Container(cls.tmp)
            cls.install()
        except BaseException:
            cls.tearDownClass()  # unittest does not call it when setUpClass fails
            raise

    @classmethod
    def install(cls):
        # The commands of docs/operations.md sections 1, 2 and 4, as written there (the binary is
        # bound in at /usr/local/bin; a made-up host key stands in for ssh-keyscan's answer).
        cls.c.sh("""
cd /mnt/kb
useradd --system --home-dir /var/lib/kernel-bridge --shell /usr/sbin/nologin kernel-bridge
install -d -m 0750 -o root -g kernel-bridge /etc/kernel-bridge
ssh-keygen -q -t ed25519 -N '' -f /root/login-host-key
echo "login1.example.org $(cat /root/login-host-key.pub)" > /etc/kernel-bridge/known_hosts
ssh-keygen -q -t ed25519 -N '' -C kernel-bridge@hub -f /etc/kernel-bridge/id_ed25519
chown kernel-bridge /etc/kernel-bridge/id_ed25519
cp etc/kernel-bridge.service /etc/systemd/system/
systemctl daemon-reload
""")

    def setUp(self):
        # Each test starts from the stopped unit and the shipped configuration (section 1).
        self.c.sh(f"""
systemctl stop {UNIT}
systemctl reset-failed {UNIT} || true
cd /mnt/kb
install -m 0640 -o root -g kernel-bridge etc/kernel-bridge.toml /etc/kernel-bridge/kernel-bridge.toml
""")

    @classmethod
    def tearDownClass(cls):
        if cls.c is not None:
            cls.c.stop()
        shutil.rmtree(getattr(cls, "tmp", "/nonexistent"), ignore_errors=True)
        shutil.rmtree(f"/run/systemd/nspawn/propagate/kbsd{os.getpid()}", ignore_errors=True)

    def wait_state(self, wanted, timeout=30):
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.c.run(["systemctl", "show", "-p", "ActiveState,SubState,Result,MainPID",
                                UNIT]).stdout
            props = dict(line.split("=", 1) for line in state.split())
            if wanted(props):
                return props
            time.sleep(0.2)
        raise AssertionError(f"{UNIT} did not reach the expected state in {timeout} s: {state}\n"
                             f"{self.c.journal()[-3000:]}")

    def test_the_unit_runs_the_daemon(self):
        c = self.c
        since = time.time() - 1
        c.run(["systemctl", "start", UNIT])
        props = self.wait_state(lambda p: p["ActiveState"] == "active" and p["MainPID"] != "0")
        pid = props["MainPID"]
        deadline = time.time() + 20
        while c.run(["test", "-S", "/run/kernel-bridge/api.sock"], check=False).returncode != 0:
            self.assertLess(time.time(), deadline, "no control socket:\n" + c.journal())
            time.sleep(0.2)

        # The daemon runs as the service user, with the directories systemd made for it.
        status = c.run(["cat", f"/proc/{pid}/status"]).stdout
        uid = c.run(["id", "-u", "kernel-bridge"]).stdout.strip()
        self.assertIn(f"Uid:\t{uid}\t{uid}", status)
        modes = c.run(["stat", "-c", "%a %U %n", "/run/kernel-bridge", "/run/kernel-bridge/api.sock",
                       "/var/lib/kernel-bridge"]).stdout.split("\n")
        self.assertEqual(modes[:3], ["755 kernel-bridge /run/kernel-bridge",
                                     "666 kernel-bridge /run/kernel-bridge/api.sock",
                                     "700 kernel-bridge /var/lib/kernel-bridge"])

        # root is an admin in the shipped config: the CLI and the API answer on the socket.
        r = c.run(["kernel-bridge", "list"])
        self.assertIn("no running kernels", r.stdout.lower())
        out = json.loads(c.run(["/usr/bin/python3", "-"], input=API_CLIENT).stdout)
        self.assertEqual(out["health"][0], 200, out)
        self.assertEqual(out["push"][0], 200, out)
        self.assertEqual(out["create"][0], 201, out)
        ended = out["ended"]
        self.assertEqual(ended["state"], "ended", ended)
        self.assertEqual(ended["end_cause"], "submit_failed", ended)
        self.assertIn("unicore.example.org", ended["reason"])

        # Reload: SIGHUP, the daemon keeps running.
        c.run(["systemctl", "reload", UNIT])
        deadline = time.time() + 10
        while "SIGHUP: reloading the API tokens" not in c.journal(since):
            self.assertLess(time.time(), deadline, "reload not seen in the journal:\n" + c.journal())
            time.sleep(0.2)
        self.assertEqual(self.wait_state(lambda p: p["ActiveState"] == "active")["MainPID"], pid)

        # Stop: SIGTERM, the daemon exits 0; the shipped config keeps kernels for the next start.
        c.run(["systemctl", "stop", UNIT])
        props = self.wait_state(lambda p: p["ActiveState"] == "inactive")
        self.assertEqual(props["Result"], "success", props)
        journal = c.journal(since)
        for line in ("kernel-bridge serve: 1 site(s) from /etc/kernel-bridge/kernel-bridge.toml",
                     "api: root GET /v1/kernels -> 200",
                     "ended (submit_failed)",
                     "signal 15: stopping; kernels, agents and jobs keep running"):
            self.assertIn(line, journal)
        self.assertNotIn("t" * 40, journal)  # the pushed token is never logged

    def test_a_kernel_through_the_daemon_systemd_runs(self):
        """The whole path with the daemon under systemd's hardening: OpenSSH and the UNICORE test
        site on loopback addresses inside the container (tests/etc/systemd_site.py), the unit
        restarted with a configuration for them, a kernel started by jupyter_client."""
        c = self.c
        since = time.time() - 1
        r = c.run(["env", "PYTHONDONTWRITEBYTECODE=1", "/usr/bin/python3",
                   "/mnt/kb/tests/etc/systemd_site.py"], check=False, timeout=240)
        journal = c.journal(since)
        self.assertEqual(r.returncode, 0, f"{r.stdout}\n{r.stderr[-4000:]}\njournal:\n{journal[-4000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        kbtest.log(f"kernel ready {out['ready_s']} s after Jupyter started the wrapper")
        self.assertEqual(out["reply_status"], "ok", out)
        self.assertEqual(out["stream"], "42\n", out)
        self.assertEqual(out["kernel"]["owner"], "root", out)
        # systemctl restart with the kernel running: re-attached, the variable kept, no new kernel.
        kbtest.log(f"systemctl restart → kernel ready again in {out['reattach_s']} s")
        self.assertTrue(out["wrapper_alive"], out)
        self.assertEqual(out["after_restart"], "42\n", out)
        self.assertEqual(out["kernels_after"], [out["kernel"]["id"]], out)
        # The connections went through systemd's file-descriptor store: nothing in flight lost.
        kbtest.log(f"print loop across systemctl restart: {out['loop_numbers']} of 200 arrived, "
                   f"lost {out['loop_lost']}, replies {out['loop_replies']}")
        self.assertRegex(journal, r"\(1 of 1 handed over by the previous process")
        self.assertIn("re-attached: the link session resumed", journal)
        self.assertTrue(out["loop_in_order"], out)
        self.assertEqual(out["loop_lost"], [], out)
        self.assertEqual(out["loop_replies"], ["ok"], out)
        self.assertIsNone(out["left_running"], out)
        self.assertEqual(len(out["jobs"]), 1, out)
        # The daemon (as kernel-bridge, under the unit's sandbox) did the SSH and UNICORE work.
        self.assertRegex(journal, r"\[\w+\] requested → submitted")
        self.assertIn("ready", journal)
        c.run(["systemctl", "stop", UNIT])
        self.assertEqual(self.wait_state(lambda p: p["ActiveState"] == "inactive")["Result"], "success")

    def test_a_broken_config_fails_the_unit_with_the_reason(self):
        c = self.c
        since = time.time() - 1
        c.sh("cp /etc/kernel-bridge/kernel-bridge.toml /root/good.toml && "
             "sed -i 's/^max_nodes = 4/max_nodes = \"many\"/' /etc/kernel-bridge/kernel-bridge.toml")
        try:
            c.run(["systemctl", "start", UNIT], check=False)
            # Exit 2 (configuration error); Restart=on-failure tries again every 5 s.
            self.wait_state(lambda p: p["Result"] == "exit-code")
            journal = c.journal(since)
            self.assertIn("max_nodes", journal)
            self.assertIn("/etc/kernel-bridge/kernel-bridge.toml", journal)
            status = c.run(["systemctl", "show", "-p", "ExecMainStatus", UNIT]).stdout.strip()
            self.assertEqual(status, "ExecMainStatus=2")
        finally:
            c.sh("cp /root/good.toml /etc/kernel-bridge/kernel-bridge.toml")
        # Fixed: the next automatic restart (or a start) runs the daemon again.
        c.run(["systemctl", "restart", UNIT])
        self.wait_state(lambda p: p["ActiveState"] == "active" and p["SubState"] == "running")
        c.run(["systemctl", "stop", UNIT])
        self.wait_state(lambda p: p["ActiveState"] == "inactive")


if __name__ == "__main__":
    kbtest.main()
