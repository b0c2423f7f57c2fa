"""What a user sees when a remote kernel cannot start or dies (issue "bridge service", item 5), and
that two users cannot touch each other's kernels (item 6). The wrapper (`kernel-bridge kernel`) is
started by hand with a Jupyter connection file, as Jupyter's local provisioner would; its stderr is
what JupyterLab's log shows the user.

Each failure: a clear message on the wrapper's stderr, a non-zero exit, and nothing left running
(no live kernel, no active UNICORE job, no process in the compute host).
"""
import json
import os
import pwd
import signal
import subprocess
import time
import unittest

import kbtest
from kbfront import BIN, FrontSite, FrontSiteCase, Wrapper, log


class FrontDoorFailures(FrontSiteCase):
    site_args = {"queue_delay": 0.5, "restart_grace": "5s"}

    def setUp(self):
        self.fs.control("POST", "/reset")
        self.fs.push_token("root")
        self.wrappers = []

    def tearDown(self):
        for w in self.wrappers:
            w.kill()
        self.fs.stop_all()

    def connection_file(self, owner=None):
        path = os.path.join(self.fs.dir, f"conn-{time.time_ns()}.json")
        ports = {}
        for ch in kbtest.CHANNELS:
            s = __import__("socket").socket()
            s.bind(("127.0.0.1", 0))
            ports[ch] = s.getsockname()[1]
            s.close()
        kbtest.write_connection_file(path, ports)
        if owner:
            os.chown(path, pwd.getpwnam(owner).pw_uid, -1)
        return path

    def wrapper(self, *args, **kw):
        w = Wrapper(self.fs, self.connection_file(kw.get("user")), *args, **kw)
        self.wrappers.append(w)
        return w

    def assert_fails(self, w, *needles, timeout=120):
        rc = w.wait(timeout)
        text = w.stderr()
        log(f"wrapper exit {rc}:\n{text}")
        self.assertNotEqual(rc, 0, text)
        for n in needles:
            self.assertIn(n.lower(), text.lower())
        self.fs.wait_nothing_running(timeout=60)
        return rc, text

    # -----------------------------------------------------------------------------------------
    def test_unknown_site(self):
        rc, text = self.assert_fails(self.wrapper(site="nosuchsite"), "unknown site", "nosuchsite")
        self.assertEqual(rc, 2)
        self.assertIn(self.fs.site_name, text)  # the configured sites are listed

    def test_resources_beyond_limits(self):
        rc, text = self.assert_fails(self.wrapper("--runtime", "48h"), "max_runtime")
        self.assertEqual(rc, 2)
        rc, text = self.assert_fails(self.wrapper("--nodes", "5"), "max_nodes")
        self.assertEqual(rc, 2)

    def test_refused_token(self):
        self.fs.push_token("root", "tok-not-valid-at-the-site")
        rc, text = self.assert_fails(self.wrapper(), "credentials")
        self.assertNotIn("tok-not-valid-at-the-site", text)  # never a secret in the output
        self.assertNotIn(self.fs.tokens["root"], text)

    def test_unicore_down_at_start(self):
        # Every request to UNICORE fails as a dropped connection (server down / unreachable).
        self.fs.control("POST", "/faults", {"garbage_next": {"count": 100000, "kind": "drop"}})
        rc, text = self.assert_fails(self.wrapper(), "unicore", timeout=180)

    def test_job_fails(self):
        # The job's main process (the agent) is killed on the compute node: the batch system
        # reports the job FAILED; the user learns it from the wrapper.
        w = self.wrapper()
        k = self.fs.wait_kernel(lambda k: k["state"] == "ready", timeout=120, what="kernel ready")
        agents = subprocess.run(["ip", "netns", "exec", self.fs.info["hosts"]["compute"]["ns"],
                                 "pgrep", "-f", "kernel-bridge agent"], capture_output=True, text=True)
        pids = [int(p) for p in agents.stdout.split()]
        # pgrep in the namespace still sees every pid; keep only those in the compute host.
        pids = [p for p in pids if p in self.fs.compute_pids()] or pids
        self.assertTrue(pids, "no agent process found in the compute host")
        for p in pids:
            os.kill(p, signal.SIGKILL)
        rc, text = self.assert_fails(w, k["id"])
        view = self.fs.kernel(k["id"])
        self.assertEqual(view["state"], "ended")
        self.assertTrue(view["reason"], view)
        self.assertIn(view["reason"][:40], text)

    def test_killed_wrapper_leaves_nothing_running(self):
        # SIGKILL gives the wrapper no chance to say goodbye (Jupyter does this when a shutdown
        # times out; so does the OOM killer). Its lease runs out, the daemon shuts the kernel down
        # and, after the restart grace, aborts the job: no compute hours burn for nobody.
        w = self.wrapper("--lease", "6")
        k = self.fs.wait_kernel(lambda k: k["state"] == "ready", timeout=120, what="kernel ready")
        self.assertTrue(self.fs.compute_pids(), "the kernel should run in the compute host")
        killed_at = time.monotonic()
        w.proc.kill()
        w.proc.wait()
        view = self.fs.wait_kernel(lambda v: v["id"] == k["id"] and v["state"] == "ended",
                                   timeout=60, what="the abandoned kernel ended")
        log(f"ended {time.monotonic() - killed_at:.1f} s after the SIGKILL: {view['reason']}")
        self.assertEqual(view["end_cause"], "shutdown")
        self.assertIn("no status request from its front end", view["reason"])
        self.fs.wait_nothing_running(timeout=60)

    def test_daemon_unreachable(self):
        w = Wrapper(self.fs, self.connection_file())
        self.wrappers.append(w)
        # Same wrapper, but pointed at a socket where no daemon listens.
        w2 = subprocess.run([BIN, "kernel", "--socket", os.path.join(self.fs.dir, "nobody.sock"),
                             "--site", self.fs.site_name, self.connection_file()],
                            capture_output=True, text=True, timeout=30)
        self.assertEqual(w2.returncode, 1)
        self.assertIn("kernel-bridge serve", w2.stderr)
        self.assertIn("nobody.sock", w2.stderr)
        w.proc.send_signal(signal.SIGTERM)
        w.wait(60)
        self.fs.wait_nothing_running(timeout=60)

    def test_doctor(self):
        fs = self.fs
        token = os.path.join(fs.dir, "doctor-token")
        with open(token, "w") as f:
            f.write(fs.tokens["root"] + "\n")
        os.chmod(token, 0o600)
        r = subprocess.run([BIN, "doctor", "--config", fs.config_path, "--token-file", token],
                           capture_output=True, text=True, timeout=120)
        log("doctor:\n" + r.stdout)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        for check in ("UNICORE http", "UNICORE credentials", "SSH", "agent"):
            self.assertRegex(r.stdout, rf"PASS  site {fs.site_name}: {check}")
        self.assertRegex(r.stdout, r"PASS  state database .*state\.db: schema 2, \d+ live kernel")
        self.assertNotIn(fs.tokens["root"], r.stdout + r.stderr)
        # The login host's key is not the one known_hosts has: FAIL with what to do; a refused token too.
        other = os.path.join(fs.dir, "other_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
        with open(fs.info["known_hosts"]) as f:
            host = f.read().split()[0]
        with open(other + ".pub") as f:
            wrong = os.path.join(fs.dir, "wrong_known_hosts")
            with open(wrong, "w") as out:
                out.write(host + " " + " ".join(f.read().split()[:2]) + "\n")
        bad_config = fs.write_config(os.path.join(fs.dir, "wrong-host-key.toml"), known_hosts=wrong)
        with open(token, "w") as f:
            f.write("not-a-valid-token\n")
        r = subprocess.run([BIN, "doctor", "--config", bad_config, "--token-file", token],
                           capture_output=True, text=True, timeout=120)
        log("doctor:\n" + r.stdout)
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stdout, rf"FAIL  site {fs.site_name}: SSH .*host key")
        self.assertIn("known_hosts", r.stdout)
        self.assertRegex(r.stdout, rf"FAIL  site {fs.site_name}: UNICORE credentials")
        self.assertNotIn("not-a-valid-token", r.stdout + r.stderr)

    def test_bad_connection_file(self):
        bad = os.path.join(self.fs.dir, "bad.json")
        with open(bad, "w") as f:
            json.dump({"ip": "127.0.0.1", "transport": "tcp", "shell_port": 1}, f)
        r = subprocess.run([BIN, "kernel", "--socket", self.fs.socket_path, "--site", self.fs.site_name, bad],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn(bad, r.stderr)
        self.assertIn("iopub_port", r.stderr)


class TwoUsers(unittest.TestCase):
    """alice and bob, two Unix users (the bridge's identity on its socket is the peer's uid):
    neither can list, see, interrupt or stop the other's kernel."""
    fs = None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to create and switch users")
        cls.created = [u for u in ("alice", "bob") if kbtest.ensure_user(u)]
        cls.fs = FrontSite(queue_delay=0.5, restart_grace="5s")
        cls.fs.__enter__()
        cls.fs.enter_hub()
        os.chmod(cls.fs.dir, 0o711)  # the users reach the socket inside the test's directory

    @classmethod
    def tearDownClass(cls):
        if cls.fs is not None:
            cls.fs.__exit__(None, None, None)
        for u in getattr(cls, "created", []):
            subprocess.run(["userdel", u], capture_output=True)

    def as_user(self, user, *args):
        return subprocess.run(["runuser", "-u", user, "--", BIN, *args, "--socket", self.fs.socket_path],
                              capture_output=True, text=True, timeout=60)

    def push_as(self, user):
        body = json.dumps({"token": self.fs.tokens[user]})
        code = ("import http.client, socket, sys\n"
                "class C(http.client.HTTPConnection):\n"
                "    def connect(self):\n"
                "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
                "c = C('x'); c.request('PUT', '/v1/users/' + sys.argv[2] + '/credentials', body=sys.stdin.read(),"
                " headers={'Content-Type': 'application/json'})\n"
                "r = c.getresponse(); print(r.status, r.read().decode()); sys.exit(0 if r.status < 300 else 1)\n")
        r = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", code, self.fs.socket_path, user],
                           input=body, capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_isolation(self):
        fs = self.fs
        fs.hold_queue(3600)  # a queued kernel is a kernel: no need to wait for it
        self.push_as("alice")
        cf = os.path.join(fs.dir, "alice-conn.json")
        ports = {}
        import socket
        for ch in kbtest.CHANNELS:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            ports[ch] = s.getsockname()[1]
            s.close()
        kbtest.write_connection_file(cf, ports)
        os.chown(cf, pwd.getpwnam("alice").pw_uid, -1)
        w = Wrapper(fs, cf, user="alice")
        try:
            deadline = time.time() + 60
            kid = None
            while time.time() < deadline and not kid:
                r = self.as_user("alice", "list", "--json")
                self.assertEqual(r.returncode, 0, r.stderr)
                ks = json.loads(r.stdout)["kernels"]
                kid = ks[0]["id"] if ks else None
                time.sleep(0.3)
            self.assertTrue(kid, "alice's kernel never appeared in her list:\n" + w.stderr())
            self.assertEqual(ks[0]["owner"], "alice")

            # bob: not in his list, not visible, cannot stop or interrupt it.
            r = self.as_user("bob", "list", "--json", "--all")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual([k["id"] for k in json.loads(r.stdout)["kernels"]], [])
            r = self.as_user("bob", "status", kid)
            self.assertEqual(r.returncode, 1)
            self.assertIn("no kernel", r.stderr)
            r = self.as_user("bob", "stop", kid)
            self.assertEqual(r.returncode, 1)
            self.assertIn("no kernel", r.stderr)
            code = ("import http.client, socket, sys\n"
                    "class C(http.client.HTTPConnection):\n"
                    "    def connect(self):\n"
                    "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
                    "c = C('x'); c.request('POST', '/v1/kernels/' + sys.argv[2] + '/interrupt')\n"
                    "print(c.getresponse().status)\n")
            r = subprocess.run(["runuser", "-u", "bob", "--", "/usr/bin/python3", "-c", code, fs.socket_path, kid],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.stdout.strip(), "404")
            # ... and alice's kernel is untouched by all that.
            r = self.as_user("alice", "status", kid, "--json")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertNotEqual(json.loads(r.stdout)["state"], "ended")
            self.assertIsNone(w.proc.poll())

            # alice stops her own kernel: the wrapper ends in order.
            r = self.as_user("alice", "stop", kid)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("ended", r.stdout)
            rc = w.wait(60)
            self.assertEqual(rc, 0, w.stderr())
        finally:
            w.kill()
            fs.hold_queue(0)


if __name__ == "__main__":
    kbtest.main()
