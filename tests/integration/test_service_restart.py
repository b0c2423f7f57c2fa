"""The bridge's own restart loses no kernel (issue "a bridge restart or crash loses no kernel"):
a real jupyter_client KernelManager runs a kernel through the kernelspec wrapper, then
`kernel-bridge serve` is (a) SIGKILLed and started again, (b) restarted in place (SIGUSR2: it
hands every kernel's connections and link session to its next image — nothing in flight may be
lost), (c) stopped with SIGTERM under bridge.on_stop = "keep-kernels" without a service manager to
hold the connections, and started again. After each: the same kernel id, the same job
(no new one on the site), the kernel's variables and process are the ones from before, the wrapper
never exited (so Jupyter never saw a dead kernel and never restarted it), and the job is followed
again once the hub pushes the user's token (tokens are memory only). Also: three kernels of two
users across a crash keep their owners and neither user sees the other's; a job that ends while
the bridge is down gets its real reason after the restart; a corrupt state database stops serve
with a message naming the file, and --start-empty keeps the file aside; a canary token and link
secret used through a kernel's whole life appear nowhere but where docs/state.md says.

A print loop runs across each restart; what it loses in flight is counted and logged (the design
note in docs/state.md says why a crash loses what was on the wire): every number that arrives
arrives once and in order.
"""
import os
import re
import signal
import subprocess
import threading
import time

import kbtest
from fullsite import BIN
from kbfront import (FrontSiteCase, kernel_manager, log, ready_client, shut_down_all, start,
                     stderr_of)


class BridgeRestart(FrontSiteCase):
    site_args = {"queue_delay": 1.0, "restart_grace": "30s", "admin_users": ("root",)}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.fs.push_token("root")
        cls.fs.install_kernelspec("kb-box", "--runtime", "30m")
        cls.compute_host = cls.fs.info["hosts"]["compute"]["hostname"]

    def setUp(self):
        if self.fs.serve is None or self.fs.serve.poll() is not None:
            self.fs.start_serve()  # a failed test may have left it stopped
        self.fs.control("POST", "/reset")
        self.fs.push_token("root")
        self._kms = []

    def tearDown(self):
        shut_down_all(self._kms, now=True)
        self.fs.stop_all()

    def new_km(self):
        path = os.path.join(self.fs.dir, f"wrapper-restart-{len(self._kms)}-{time.time():.0f}.log")
        km = kernel_manager("kb-box", path)
        self._kms.append(km)
        return km

    # ---- the bridge going away and coming back ----------------------------------------------
    def kill_serve(self):
        fs = self.fs
        os.kill(fs.serve.pid, signal.SIGKILL)
        fs.serve.wait(timeout=30)

    def term_serve(self):
        fs = self.fs
        fs.serve.send_signal(signal.SIGTERM)
        self.assertEqual(fs.serve.wait(timeout=60), 0, fs.tail("serve.log"))

    def restart_serve(self, config=None):
        t0 = time.time()
        self.fs.start_serve(config)
        return time.time() - t0

    def usr2_serve(self):
        """Restart in place: the same process executes itself again and takes its connections."""
        self._starts = self.fs.tail("serve.log", 4000000).count("kernel-bridge serve: ")
        self.fs.serve.send_signal(signal.SIGUSR2)

    def wait_reexec(self, config=None):
        t0 = time.time()
        deadline = t0 + 60
        while self.fs.tail("serve.log", 4000000).count("kernel-bridge serve: ") <= self._starts:
            self.assertIsNone(self.fs.serve.poll(), "serve exited:\n" + self.fs.tail("serve.log"))
            self.assertLess(time.time(), deadline, "serve did not come back")
            time.sleep(0.05)
        self.fs.wait_api(proc=self.fs.serve)
        return time.time() - t0

    def site_jobs(self):
        return [j for j in self.fs.unicore_jobs()]

    def survives(self, stop, config=None, restart=None):
        """A kernel with state, a print loop across `stop` + start; returns the loop's figures."""
        fs = self.fs
        km = self.new_km()
        start(km)
        kc = ready_client(km, timeout=120)
        reply, _, _ = kbtest.run_cell(kc, "import os; x = 6 * 7; pid = os.getpid()")
        self.assertEqual(reply["content"]["status"], "ok")
        kid = fs.live_kernels()[0]["id"]
        jobs_before = len(self.site_jobs())

        # A numbered print loop, running while the bridge goes away and comes back.
        numbers, replies = [], []
        loop_id = kc.execute("import time\nfor i in range(300):\n    print(i, flush=True)\n"
                             "    time.sleep(0.05)\n")


        def shell_replies():
            deadline = time.time() + 90
            while time.time() < deadline:
                try:
                    m = kc.get_shell_msg(timeout=0.5)
                except Exception:  # noqa: BLE001 (queue.Empty)
                    continue
                if m["parent_header"].get("msg_id") == loop_id:
                    replies.append(m)
                    # go on listening a little: a second reply would be a duplicate
                    deadline = min(deadline, time.time() + 3)

        collector = threading.Thread(target=kbtest.collect_printed_numbers,
                                     args=(kc, loop_id, numbers, 90), daemon=True)
        shell = threading.Thread(target=shell_replies, daemon=True)
        collector.start()
        shell.start()
        time.sleep(3)
        stop()
        alive_during = km.is_alive()
        took = (restart or self.restart_serve)(config)
        log(f"serve back up in {took:.1f} s")

        # Re-attached: the same kernel, never ended; the wrapper stayed (Jupyter saw no death).
        k = fs.wait_kernel(lambda k: k["id"] == kid and k["state"] == "ready", timeout=60,
                           what="the kernel re-attached")
        self.assertTrue(alive_during and km.is_alive(), "the wrapper exited:\n" + stderr_of(km))
        self.assertEqual(k["restarts"], 0)
        self.assertTrue(any("re-attached" in p["message"] for p in k["progress"]), k["progress"])
        collector.join(timeout=100)
        shell.join(timeout=100)
        lost = sorted(set(range(300)) - set(numbers))
        log(f"print loop over the restart: {len(numbers)} of 300 numbers arrived, "
            f"{len(lost)} lost ({lost[:3]}…{lost[-3:] if lost else ''}), "
            f"{len(replies)} execute_reply")
        self.assertEqual(numbers, sorted(set(numbers)), "a number arrived twice or out of order")
        self.assertLessEqual(len(replies), 1, "the execute_reply arrived twice")

        # The variables and the process are the ones from before the restart.
        kc.stop_channels()
        kc = ready_client(km, timeout=60)
        reply, out, _ = kbtest.run_cell(kc, "print(x, os.getpid() == pid)", timeout=60)
        self.assertEqual(out.strip(), "42 True")
        self.assertEqual(len(self.site_jobs()), jobs_before, "a new job was submitted")
        self.assertTrue(km.is_alive())
        # Tokens are never stored: the job is followed again once the hub pushes one.
        fs.push_token("root")
        fs.wait_kernel(lambda k: k["id"] == kid and any(
            "token arrived" in p["message"] for p in k["progress"]), timeout=30,
            what="the job followed again")
        kc.stop_channels()
        km.shutdown_kernel()
        return len(numbers), lost, len(replies)

    # -----------------------------------------------------------------------------------------
    def test_crash_sigkill_then_start(self):
        got, lost, replies = self.survives(self.kill_serve)
        log(f"crash: {got} numbers delivered, {len(lost)} lost in flight, {replies} reply")

    def test_planned_restart_in_place_loses_nothing(self):
        pid = self.fs.serve.pid
        got, lost, replies = self.survives(self.usr2_serve, restart=self.wait_reexec)
        log(f"restart in place: {got} numbers delivered, {len(lost)} lost, {replies} reply")
        self.assertEqual(self.fs.serve.pid, pid)
        log_text = self.fs.tail("serve.log", 4000000)
        self.assertIn("SIGUSR2: restarting in place", log_text)
        # Every live allocation was handed over (a parked one of an earlier test too).
        handed = re.findall(r"\((\d+) of (\d+) handed over by the previous process", log_text)
        self.assertTrue(handed and handed[-1][0] == handed[-1][1] != "0", handed)
        self.assertEqual(lost, [], "numbers lost over a planned restart")
        self.assertEqual(replies, 1, "the execute_reply did not arrive exactly once")

    def test_stop_and_start_keep_kernels_without_a_service_manager(self):
        config = self.fs.write_config(path=os.path.join(self.fs.dir, "keep.toml"))
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace("[api]", 'on_stop = "keep-kernels"\n\n[api]', 1))
        # The running serve has the default (end-kernels): restart it with the keep setting first.
        self.fs.stop_serve()
        self.restart_serve(config)
        self.fs.push_token("root")
        try:
            got, lost, replies = self.survives(self.term_serve, config)
            log(f"stop + start without a service manager: {got} numbers delivered, "
                f"{len(lost)} lost, {replies} reply")
            self.assertIn("kernels, agents and jobs keep running", self.fs.tail("serve.log", 400000))
        finally:
            self.fs.stop_all()
            self.fs.stop_serve()
            self.restart_serve()

    def test_three_kernels_two_users_keep_their_owners(self):
        fs = self.fs
        for user in ("alice", "bob"):
            fs.push_token(user)
        ids = {}
        for n, user in enumerate(("alice", "alice", "bob")):
            status, k = self.create_as(user, 5000 + 10 * n)
            self.assertEqual(status, 201, k)
            ids[k["id"]] = user
        for kid in ids:
            fs.wait_kernel(lambda k, kid=kid: k["id"] == kid and k["state"] == "ready",
                           timeout=120, what=f"kernel {kid} ready")
        self.kill_serve()
        self.restart_serve()
        for kid, user in ids.items():
            k = fs.wait_kernel(lambda k, kid=kid: k["id"] == kid and k["state"] == "ready",
                               timeout=60, what=f"kernel {kid} re-attached")
            self.assertEqual(k["owner"], user)
        for user in ("alice", "bob"):
            status, body = fs.api("GET", "/v1/kernels", headers={"X-Kernel-Bridge-User": user})
            self.assertEqual(status, 200, body)
            mine = {k["id"] for k in body["kernels"] if k["state"] != "ended"}
            self.assertEqual(mine, {kid for kid, u in ids.items() if u == user})
            other = next(kid for kid, u in ids.items() if u != user)
            status, _ = fs.api("GET", f"/v1/kernels/{other}",
                               headers={"X-Kernel-Bridge-User": user})
            self.assertEqual(status, 404, f"{user} sees {ids[other]}'s kernel after the restart")

    def test_a_job_that_ends_while_the_bridge_is_down_gets_its_real_reason(self):
        fs = self.fs
        status, k = self.create_as("root", 5100, resources={"runtime": "15s"})
        self.assertEqual(status, 201, k)
        kid = k["id"]
        k = fs.wait_kernel(lambda k: k["id"] == kid and k["state"] == "ready", timeout=120,
                           what="the short kernel ready")
        self.kill_serve()
        # The site ends the job at its 15 s runtime while no bridge is there.
        deadline = time.time() + 90
        while time.time() < deadline:
            job = {j["id"]: j for j in fs.unicore_jobs()}[k["job"]["id"]]
            if job["status"] in ("FAILED", "SUCCESSFUL"):
                break
            time.sleep(0.5)
        self.assertEqual(job["status"], "FAILED", job)
        # The hub would push the token at once; hold it back to see the kernel wait for it.
        self.restart_serve()
        time.sleep(3)
        k = fs.kernel(kid)
        self.assertNotEqual(k["state"], "ended", "ended before the site was asked: " + k["reason"])
        self.assertTrue(any("holds no UNICORE token" in p["message"] for p in k["progress"]))
        fs.push_token("root")
        k = fs.wait_kernel(lambda k: k["id"] == kid and k["state"] == "ended", timeout=60,
                           what="the kernel ended with the job's reason")
        log(f"reason after re-attach: {k['end_cause']}: {k['reason']}")
        self.assertEqual(k["end_cause"], "walltime", k)
        self.assertIn("TIME LIMIT", k["reason"])

    def test_corrupt_database_refuses_to_start_and_start_empty_keeps_it(self):
        fs = self.fs
        fs.stop_serve()
        db = os.path.join(fs.dir, "bridge-state", "state.db")
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        with open(db, "r+b") as f:
            f.write(b"definitely not SQLite")
        r = subprocess.run([BIN, "serve", "--config", fs.config_path], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn(db, r.stderr)
        self.assertIn("--start-empty", r.stderr)
        log("corrupt database:", r.stderr.strip())
        self.fs.serve = None
        log_f = fs._log("serve-start-empty.log")
        fs.serve = fs.box.popen("hub", [BIN, "serve", "--config", fs.config_path, "--start-empty"],
                                stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True)
        fs.wait_api(proc=fs.serve)
        kept = [n for n in os.listdir(os.path.dirname(db)) if n.startswith("state.db.unreadable-")]
        self.assertEqual(len(kept), 1, os.listdir(os.path.dirname(db)))
        with open(os.path.join(os.path.dirname(db), kept[0]), "rb") as f:
            self.assertTrue(f.read().startswith(b"definitely not SQLite"))
        out = subprocess.run(["sqlite3", db, "PRAGMA user_version"], capture_output=True,
                             text=True)
        self.assertEqual(out.stdout.strip(), "2", out.stderr)

    def test_a_database_from_an_older_schema_is_migrated_and_its_kernel_reattached(self):
        """The state database a previous kernel-bridge (schema 1: the secrets were columns of
        allocations) left behind, with a live kernel in it: serve migrates it in place, says so,
        and re-attaches the kernel with its variables."""
        fs = self.fs
        km = self.new_km()
        start(km)
        kc = ready_client(km, timeout=120)
        kbtest.run_cell(kc, "old = 'schema one'")
        kid = fs.live_kernels()[0]["id"]
        self.kill_serve()
        db = os.path.join(fs.dir, "bridge-state", "state.db")
        downgrade = """
ALTER TABLE allocations ADD COLUMN link_secret TEXT NOT NULL DEFAULT '';
ALTER TABLE allocations ADD COLUMN jupyter_key TEXT NOT NULL DEFAULT '';
ALTER TABLE allocations ADD COLUMN signature_scheme TEXT NOT NULL DEFAULT '';
UPDATE allocations SET
  link_secret = (SELECT link_secret FROM secrets s WHERE s.allocation_id = allocations.id),
  jupyter_key = (SELECT jupyter_key FROM secrets s WHERE s.allocation_id = allocations.id),
  signature_scheme = (SELECT signature_scheme FROM secrets s WHERE s.allocation_id = allocations.id);
DROP TABLE secrets;
PRAGMA user_version = 1;
"""
        subprocess.run(["sh", "-c", f"umask 077; sqlite3 '{db}'"], input=downgrade, text=True,
                       check=True, timeout=60)
        version = subprocess.run(["sqlite3", "-readonly", db, "PRAGMA user_version"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        self.assertEqual(version, "1")
        self.restart_serve()
        self.assertIn("migrated from schema 1 to 2", fs.tail("serve.log", 200000))
        fs.push_token("root")
        fs.wait_kernel(lambda k: k["id"] == kid and k["state"] == "ready", timeout=60,
                       what="re-attached from the migrated file")
        self.assertTrue(km.is_alive(), stderr_of(km))
        reply, out, _ = kbtest.run_cell(kc, "print(old)", timeout=60)
        self.assertEqual(out.strip(), "schema one")
        version = subprocess.run(["sqlite3", "-readonly", db, "PRAGMA user_version"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        self.assertEqual(version, "2")
        kc.stop_channels()
        km.shutdown_kernel()
        fs.wait_nothing_running(timeout=90)  # its allocation released: the next test starts clean

    def test_canary_token_and_link_secret_stay_where_documented(self):
        """A recognisable UNICORE token and link secret through a kernel's whole life (start,
        Jupyter restart, crash + re-attach, restart in place with the handover, shutdown):
        afterwards neither is in any log, any process's argv or environment, or any file but
        those docs/state.md names — in the run's directory and everywhere else a process of
        this machine writes (/tmp, /var, /etc, /run, /root, /home, /dev/shm, /srv, /opt)."""
        fs = self.fs
        token = fs.tokens["root"]  # "tok-root-<12 hex>", unique to this run
        km = self.new_km()
        start(km)
        kc = ready_client(km, timeout=120)
        kbtest.run_cell(kc, "v = 1")
        db = os.path.join(fs.dir, "bridge-state", "state.db")
        rows = subprocess.run(["sqlite3", "-readonly", db, "SELECT link_secret FROM secrets"],
                              capture_output=True, text=True, check=True).stdout.split()
        self.assertEqual(len(rows), 1, rows)
        secret = rows[0]
        self.assertRegex(secret, r"^[0-9a-f]{64}$")
        kc.stop_channels()
        km.restart_kernel(now=False)  # Jupyter's restart: a new wrapper, the same job
        kc = ready_client(km, timeout=120)
        self.kill_serve()
        self.restart_serve()
        fs.push_token("root")
        fs.wait_kernel(lambda k: k["state"] == "ready", timeout=60, what="re-attached")
        kbtest.run_cell(kc, "v = 2")
        self.usr2_serve()  # the handover document passes through a memfd and LISTEN_FDS
        self.wait_reexec()
        fs.push_token("root")
        fs.wait_kernel(lambda k: k["state"] == "ready", timeout=60, what="taken over")
        kbtest.run_cell(kc, "v = 3")
        kc.stop_channels()
        km.shutdown_kernel()
        fs.wait_kernel(lambda k: k["state"] == "ended", timeout=60, what="ended")
        deadline = time.time() + 60  # the restart grace, then the job's abort
        while [j for j in fs.unicore_jobs() if j["status"] not in ("FAILED", "SUCCESSFUL")]:
            self.assertLess(time.time(), deadline, "the job did not end")
            time.sleep(0.5)
        time.sleep(1)

        needles = {"token": token.encode(), "link secret": secret.encode(),
                   "link secret (bytes)": bytes.fromhex(secret)}
        # The only files that may hold them (docs/state.md): the test site's own user database
        # (the token is its password), and the job's directory on the site (the secret's file,
        # mode 0600, written by UNICORE from the authenticated job submission). state.db held the
        # secret while the job lived; once released it must be gone from it and its WAL.
        allowed = {os.path.join(fs.dir, "unicore-users.json")}
        found = []
        for root, _, files in os.walk(fs.dir):
            for name in files:
                path = os.path.join(root, name)
                if path in allowed or (name == "kernel-bridge-link.secret" and "/jobs/" in path):
                    continue
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                found += [f"{what} in {path}" for what, n in needles.items() if n in data]
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            for part in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{part}", "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                found += [f"{what} in /proc/{pid}/{part}" for what, n in needles.items()
                          if n in data]
        # Beyond the run's directory: every place a process here writes, by grep (text needles).
        grep = subprocess.run(
            ["grep", "-rlaF", "--no-messages", "-e", token, "-e", secret, "/tmp", "/var", "/etc",
             "/run", "/root", "/home", "/dev/shm", "/srv", "/opt"],
            capture_output=True, text=True, timeout=300)
        for path in grep.stdout.split("\n"):
            if not path or path in allowed or path.startswith(fs.dir + "/") and (
                    os.path.basename(path) == "kernel-bridge-link.secret" and "/jobs/" in path):
                continue
            if path.startswith("/run/netns/") or path.startswith("/proc/"):
                continue
            found.append(f"token or link secret in {path}")
        self.assertEqual(found, [], "a canary leaked")
        self.assertFalse(os.path.exists(db + "-wal") and needles["link secret"] in
                         open(db + "-wal", "rb").read())

    # ---- helpers ------------------------------------------------------------------------------
    def create_as(self, user, base, **extra):
        """POST /v1/kernels as an admin (root) acting for `user`, on hub ports base..base+4."""
        body = {"site": self.fs.site_name, "kernel": "python3", "connection": connection(base)}
        body.update(extra)
        return self.fs.api("POST", "/v1/kernels", body, headers={"X-Kernel-Bridge-User": user})


def connection(base):
    return {"transport": "tcp", "ip": "127.0.0.1", "shell_port": base, "iopub_port": base + 1,
            "stdin_port": base + 2, "control_port": base + 3, "hb_port": base + 4,
            "key": os.urandom(16).hex(), "signature_scheme": "hmac-sha256"}


if __name__ == "__main__":
    kbtest.main()
