"""The bridge service end to end (docs/lifecycle.md), on the full site in a box (fullsite.py):
`kernel-bridge serve` in the hub host, the UNICORE test site in the login host running jobs in the
compute host, a real sshd, real agents and ipykernels, and a real jupyter_client in the hub host.

Shows, through the control API on the Unix socket:
  - POST /v1/kernels with a hub connection → the job is visibly QUEUED on the site (held there),
    then RUNNING → the kernel is `ready` → a BlockingKernelClient on exactly those hub ports does
    kernel_info and execute, which prints the compute host's name;
  - POST …/restart keeps the job id and the hub ports and gives a fresh kernel (variables gone);
  - a Jupyter-style restart (DELETE, then the same connection again at once) reuses the job;
  - DELETE ends the job (after the restart grace) and leaves no process in the compute host;
  - the site enforcing the runtime ends the kernel `walltime` with the site's words, nothing left;
  - SIGTERM to `kernel-bridge serve` ends every kernel and its job, and serve exits 0;
  - a failed job ends `job_failed` with the site's statusMessage verbatim; a refused token ends
    `credentials_refused` naming the site; neither leaves anything running.
  - the user's token expires at the site while the kernel runs: the kernel keeps running (and its
    state), the user is told why the job cannot be followed, and a refreshed token resumes it;
  - a site without kernel-bridge installed: the bridge stages its own binary into the job (agent
    mode "upload") and the kernel runs from it;
  - the login node's host key changed: the kernel ends `host_key_mismatch` with the fingerprint,
    and its job is aborted.

Run: /usr/bin/python3 tests/integration/test_service_lifecycle.py   (needs root; exit 77 = skipped
where network namespaces cannot be made).
"""
import contextlib
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kbtest import NeedsNetns, enter_host, log, main, run_cell  # noqa: E402
from fullsite import BIN, FullSite  # noqa: E402

USER = "root"  # CI runs as root; the bridge identifies Unix-socket callers by their user name
GRACE_S = 4


def free_ports(n=5):
    import socket
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def hub_connection():
    ports = free_ports()
    return {"ip": "127.0.0.1", "transport": "tcp", "shell_port": ports[0], "iopub_port": ports[1],
            "stdin_port": ports[2], "control_port": ports[3], "hb_port": ports[4],
            "key": os.urandom(16).hex(), "signature_scheme": "hmac-sha256",
            "kernel_name": "python3"}


@contextlib.contextmanager
def connected(conn):
    """A started jupyter_client on the hub-side endpoints in `conn`; its channels stop afterwards."""
    from jupyter_client import BlockingKernelClient
    kc = BlockingKernelClient()
    kc.load_connection_info(conn)
    kc.start_channels()
    try:
        yield kc
    finally:
        kc.stop_channels()


class ServiceCase(unittest.TestCase):
    site_args = {}
    fs = None

    @classmethod
    def setUpClass(cls):
        cls.fs = FullSite(restart_grace=f"{GRACE_S}s", **cls.site_args)
        cls.fs.__enter__()
        if not cls.fs.box.netns:
            cls.fs.__exit__(None, None, None)
            cls.fs = None
            raise NeedsNetns("network namespaces are not available on this machine")
        enter_host(cls.fs.box, "hub")  # Jupyter clients connect from the hub host

    @classmethod
    def tearDownClass(cls):
        if cls.fs is not None:
            if os.environ.get("KB_SHOW_LOGS"):
                print(cls.fs.tail("serve.log", 20000), file=sys.stderr)
            cls.fs.__exit__(None, None, None)

    # ---- helpers -----------------------------------------------------------------------------
    def kernel(self, kid):
        status, body = self.fs.api("GET", f"/v1/kernels/{kid}")
        self.assertEqual(status, 200, body)
        return body

    def wait_kernel(self, kid, pred, what, timeout=90):
        deadline = time.time() + timeout
        k = None
        while time.time() < deadline:
            k = self.kernel(kid)
            if pred(k):
                return k
            time.sleep(0.1)
        self.fail(f"kernel {kid} never became {what}; last view: {k}\n"
                  f"--- serve.log ---\n{self.fs.tail('serve.log')}")

    def wait_state(self, kid, state, timeout=90):
        return self.wait_kernel(kid, lambda k: k["state"] == state, state, timeout)

    def site_job(self, job_id):
        return self.fs.control("GET", f"/jobs/{job_id}")

    def create(self, conn, **extra):
        body = {"site": self.fs.site_name, "kernel": "python3", "connection": conn}
        body.update(extra)
        return self.fs.api("POST", "/v1/kernels", body)

    def delete(self, kid):
        status, body = self.fs.api("DELETE", f"/v1/kernels/{kid}")
        self.assertIn(status, (200, 202, 204), body)

    def end_and_wait_gone(self, kid, job_id):
        """DELETE the kernel, then wait until its job (after the restart grace) and every process
        of it in the compute host are gone."""
        self.delete(kid)
        return self.wait_nothing_left(job_id, timeout=GRACE_S + 40)

    def wait_nothing_left(self, job_id, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.site_job(job_id)
            # The site reports "alive" from the process group at once, but records the job's end
            # (its status) when its own waiter has reaped the process: wait for both.
            if not job["alive"] and job["status"] in ("FAILED", "SUCCESSFUL") and \
                    not self.fs.compute_pids():
                return job
            time.sleep(0.2)
        self.fail(f"job {job_id} still alive or processes left in compute: "
                  f"{self.site_job(job_id)} pids {self.fs.compute_pids()}\n{self.fs.tail('serve.log')}")


class EndToEnd(ServiceCase):
    # Every job is held QUEUED until the test releases it: the QUEUED phase is seen for sure.
    site_args = {"queue_delay": 3600}

    def release(self, job_id):
        self.fs.control("POST", f"/jobs/{job_id}", {"queue_delay": 0})

    def start_ready(self, conn=None, **extra):
        """Creates a kernel, sees it queued, releases its job and waits until it is ready.
        Returns (kernel id, job id, hub connection, the ready view)."""
        self.fs.push_token(USER)
        conn = conn or hub_connection()
        status, k = self.create(conn, **extra)
        self.assertEqual(status, 201, k)
        kid = k["id"]
        job_id = self.wait_state(kid, "queued")["job"]["id"]
        self.release(job_id)
        return kid, job_id, conn, self.wait_state(kid, "ready", timeout=120)

    def test_1_queued_running_ready_execute_restart_delete(self):
        fs = self.fs
        fs.push_token(USER)
        conn = hub_connection()
        status, k = self.create(conn, name="e2e")
        self.assertEqual(status, 201, k)
        kid = k["id"]
        self.assertEqual(k["connection"]["shell_port"], conn["shell_port"])

        k = self.wait_state(kid, "queued")
        job_id = k["job"]["id"]
        self.assertTrue(job_id)
        self.assertEqual(self.site_job(job_id)["status"], "QUEUED")
        messages = [p["message"] for p in k["progress"]]
        self.assertTrue(any(f"job {job_id} submitted" in m for m in messages), messages)
        self.assertTrue(any("queued in batch" in m for m in messages), messages)

        self.release(job_id)
        k = self.wait_state(kid, "ready", timeout=120)
        self.assertEqual(self.site_job(job_id)["status"], "RUNNING")
        states = [h["state"] for h in k["history"]]
        self.assertEqual(states, ["requested", "submitted", "queued", "starting", "connecting",
                                  "ready"])
        compute_name = fs.info["hosts"]["compute"]["hostname"]
        self.assertEqual(k["node"], compute_name)
        messages = [p["message"] for p in k["progress"]]
        self.assertTrue(any(m.startswith("connecting to agent at " + fs.info["compute_addr"] + ":")
                            and m.endswith(" via " + f"{fs.info['login_addr']}:{fs.info['ssh_port']}")
                            for m in messages), messages)
        log("ready; history", states)

        with connected(conn) as kc:
            reply = kc.kernel_info(reply=True, timeout=60)
            self.assertEqual(reply["content"]["status"], "ok")
            reply, out, _ = run_cell(kc, "import socket; x = 42; print(socket.gethostname())")
            self.assertEqual(reply["content"]["status"], "ok")
            self.assertEqual(out.strip(), compute_name)

            # Restart inside the allocation: same job, same hub ports, a fresh kernel.
            status, body = fs.api("POST", f"/v1/kernels/{kid}/restart")
            self.assertIn(status, (200, 202, 204), body)
            k = self.wait_kernel(kid, lambda k: k["restarts"] == 1 and k["state"] == "ready" and
                                 any("kernel restarted" in p["message"] for p in k["progress"]),
                                 "restarted")
            self.assertEqual(k["job"]["id"], job_id)
            deadline = time.time() + 60
            while True:  # the fresh kernel answers once it has bound its ports
                try:
                    reply, out, _ = run_cell(kc, "print('x' in globals())", timeout=10)
                    break
                except Exception:  # noqa: BLE001 — a timeout while the new kernel starts
                    if time.time() > deadline:
                        raise
            self.assertEqual(out.strip(), "False")  # variables cleared

        # Shutdown: the kernel ends at once; the job after the restart grace, with nothing left.
        self.delete(kid)
        k = self.wait_state(kid, "ended")
        self.assertEqual(k["end_cause"], "shutdown")
        job = self.wait_nothing_left(job_id, timeout=GRACE_S + 40)
        self.assertEqual(job["status"] in ("FAILED", "SUCCESSFUL"), True, job)

    def test_2_jupyter_restart_reuses_the_job(self):
        first, job_id, conn, _ = self.start_ready()

        # Jupyter's restart: shutdown, then at once the same connection file again.
        self.delete(first)
        self.wait_state(first, "ended")
        status, k = self.create(conn)
        self.assertEqual(status, 201, k)
        second = k["id"]
        k = self.wait_state(second, "ready", timeout=60)
        self.assertEqual(k["job"]["id"], job_id)  # no new job, no queue wait
        with connected(conn) as kc:
            reply = kc.kernel_info(reply=True, timeout=60)
            self.assertEqual(reply["content"]["status"], "ok")
        self.end_and_wait_gone(second, job_id)

    def test_2b_link_outage_is_reconnecting_not_death(self):
        fs = self.fs
        kid, job_id, conn, _ = self.start_ready()
        with connected(conn) as kc:
            reply, out, _ = run_cell(kc, "y = 'kept'; print('set')")
            self.assertEqual(out.strip(), "set")
            fs.box.link_down()  # hub ↔ login cut for 20 s
            try:
                k = self.wait_state(kid, "reconnecting", timeout=30)
                self.assertIsNone(k["end_cause"])
                time.sleep(20)
                self.assertEqual(self.kernel(kid)["state"], "reconnecting")  # never ended
            finally:
                fs.box.link_up()
            k = self.wait_state(kid, "ready", timeout=60)
            self.assertGreaterEqual(k["link_reconnects"], 1)
            self.assertEqual(k["job"]["id"], job_id)
            reply, out, _ = run_cell(kc, "print(y)")
            self.assertEqual(out.strip(), "kept")  # the same kernel: its state survived
        status, metrics = fs.api("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertIn('kb_kernels{state="ready"} 1', metrics)
        self.assertRegex(metrics, r'kb_link_reconnects_total\{site="box"\} [1-9]')
        self.end_and_wait_gone(kid, job_id)

    def test_2c_expired_token_keeps_the_kernel_running(self):
        # The user's token expires at the site while they work (OIDC tokens live minutes to hours).
        fs = self.fs
        kid, job_id, conn, _ = self.start_ready()
        with connected(conn) as kc:
            _, out, _ = run_cell(kc, "z = 42; print('set')")
            self.assertEqual(out.strip(), "set")
            fs.control("POST", "/faults", {"expire_token": fs.tokens[USER], "expire_sessions": True})

            def says(text):
                return lambda k: any(text in p["message"] for p in k["progress"])
            k = self.wait_kernel(kid, says("cannot see the job's status"), "told about the token",
                                 timeout=60)
            self.assertEqual(k["state"], "ready", k)
            _, out, _ = run_cell(kc, "print(z)")
            self.assertEqual(out.strip(), "42")  # the kernel works on, with its state
            # The hub pushes the refreshed token: the bridge follows the job again with it.
            fresh = f"tok-{USER}-refreshed-{os.urandom(4).hex()}"
            fs.control("POST", "/faults", {"add_token": {"uid": USER, "token": fresh}})
            fs.tokens[USER] = fresh  # the old one stays refused for the tests that follow
            fs.push_token(USER)
            k = self.wait_kernel(kid, says(f"accepts the token of user {USER} again"),
                                 "following the job again", timeout=120)
            self.assertEqual(k["state"], "ready", k)
            self.assertIsNone(k["end_cause"])
        self.end_and_wait_gone(kid, job_id)  # the abort uses the fresh token

    def test_2d_token_refused_while_looking_for_the_agent(self):
        # The site refuses the token on the bridge's first read of the agent's discovery file (it
        # expired between RUNNING and that read): the kernel waits for the next read (15 s later)
        # instead of ending, and starts.
        fs = self.fs
        fs.control("POST", "/faults", {"fail_next": {"count": 1, "status": 401,
                                                     "match": "kernel-bridge-agent.json"}})
        kid, job_id, conn, k = self.start_ready()
        messages = [p["message"] for p in k["progress"]]
        self.assertTrue(any("cannot be reached until JupyterHub pushes a fresh token" in m
                            for m in messages), messages)
        self.assertTrue(any(f"accepts the token of user {USER} again" in m for m in messages),
                        messages)
        with connected(conn) as kc:
            _, out, _ = run_cell(kc, "print(6 * 7)")
            self.assertEqual(out.strip(), "42")
        self.end_and_wait_gone(kid, job_id)

    def test_3_walltime_is_named(self):
        kid, job_id, _, k = self.start_ready(resources={"runtime": "12s"})
        self.assertTrue(k["walltime_end"])
        k = self.wait_state(kid, "ended", timeout=90)  # the site enforces the 12 s runtime
        self.assertEqual(k["end_cause"], "walltime", k)
        self.assertIn("walltime reached", k["reason"])
        self.assertIn("TIME LIMIT", k["reason"])  # the site's own words
        self.wait_nothing_left(job_id, timeout=30)

    def test_4_bridge_shutdown_ends_kernels_and_jobs(self):
        # Last in this class: it stops the bridge.
        fs = self.fs
        kid, job_id, _, _ = self.start_ready()
        fs.stop_serve()
        self.assertEqual(fs.serve.returncode, 0, fs.tail("serve.log"))
        self.assertIn("every kernel released", fs.tail("serve.log"))
        job = self.wait_nothing_left(job_id, timeout=30)  # no grace: the bridge is gone
        self.assertIn(job["status"], ("FAILED", "SUCCESSFUL"))


class Failures(ServiceCase):
    # A site whose job setup fails on the node, as a missing module would.
    site_args = {"queue_delay": 0.2,
                 "extra_site_toml": 'job_template = "echo \'module python/3.99 not found\' >&2; exit 3\\nexec {agent}"'}

    def test_failed_job_gives_the_sites_status_message(self):
        fs = self.fs
        fs.push_token(USER)
        status, k = self.create(hub_connection())
        self.assertEqual(status, 201, k)
        k = self.wait_state(k["id"], "ended", timeout=60)
        self.assertEqual(k["end_cause"], "job_failed")
        job = self.site_job(k["job"]["id"])
        self.assertEqual(job["status"], "FAILED")
        self.assertTrue(job["statusMessage"])
        self.assertEqual(k["reason"], job["statusMessage"])  # verbatim
        self.assertIn("non-zero exit code", k["reason"])
        self.wait_nothing_left(k["job"]["id"], timeout=20)

    def test_refused_token_is_credentials_refused(self):
        fs = self.fs
        fs.push_token(USER, "tok-not-valid-here")
        try:
            jobs_before = len(fs.unicore_jobs())
            status, k = self.create(hub_connection())
            self.assertEqual(status, 201, k)
            k = self.wait_state(k["id"], "ended", timeout=60)
            self.assertEqual(k["end_cause"], "credentials_refused")
            self.assertIn(f"site {fs.site_name} refused the UNICORE credentials of user {USER}",
                          k["reason"])
            self.assertIn("Log in to JupyterHub again", k["reason"])
            self.assertEqual(len(fs.unicore_jobs()), jobs_before)  # nothing submitted
        finally:
            fs.push_token(USER)


class SiteChoices(ServiceCase):
    """GET /v1/sites/{site}/options with the real test site: the projects are the site's user info
    (the caller's UNICORE groups), the partitions and ranges the configuration's; a request outside
    them is refused naming the limit, before any job is submitted."""

    def test_options_come_from_the_site_and_the_config_and_bound_requests(self):
        fs = self.fs
        fs.push_token(USER)
        status, sites = fs.api("GET", "/v1/sites")
        self.assertEqual(status, 200, sites)
        self.assertEqual([s["name"] for s in sites["sites"]], [fs.site_name])
        status, o = fs.api("GET", f"/v1/sites/{fs.site_name}/options")
        self.assertEqual(status, 200, o)
        self.assertEqual(sorted(o["projects"]), ["proj1", "users"])  # the test site's groups
        self.assertNotIn("projects_note", o)
        self.assertEqual([p["name"] for p in o["partitions"]], ["batch", "gpus"])
        self.assertEqual(o["partitions"][0]["nodes"], {"min": 1, "max": 2, "default": 1})
        self.assertEqual(o["partitions"][0]["runtime_seconds"]["max"], 4 * 3600)
        self.assertEqual(o["default_partition"], "batch")
        self.assertEqual(o["kernels"], ["python3"])

        jobs_before = len(fs.unicore_jobs())
        status, e = self.create(hub_connection(), resources={"nodes": 3})
        self.assertEqual(status, 422, e)
        self.assertEqual((e["field"], e["limit"]), ("resources.nodes", "max_nodes"))
        self.assertEqual(e["error"], "nodes 3 exceeds the site's max_nodes 2")
        status, e = self.create(hub_connection(), resources={"project": "proj-of-others"})
        self.assertEqual(status, 422, e)
        self.assertEqual((e["field"], e["limit"]), ("resources.project", "projects"))
        self.assertIn("the site says: users, proj1", e["error"])
        self.assertEqual(len(fs.unicore_jobs()), jobs_before)  # nothing reached the site
        status, e = fs.api("GET", "/v1/sites/nowhere/options")
        self.assertEqual(status, 404, e)


class UploadedAgent(ServiceCase):
    # The site has no kernel-bridge installed: the bridge stages its own binary into every job.
    site_args = {"queue_delay": 0.2, "agent_mode": "upload"}

    def test_uploaded_agent_runs_the_kernel(self):
        self.fs.push_token(USER)
        conn = hub_connection()
        status, k = self.create(conn)
        self.assertEqual(status, 201, k)
        kid = k["id"]
        k = self.wait_state(kid, "ready", timeout=120)
        job = self.site_job(k["job"]["id"])
        staged = os.path.join(job["dir"], "kernel-bridge-agent")
        self.assertTrue(os.path.isfile(staged), job)
        self.assertTrue(os.access(staged, os.X_OK), "the staged agent must be executable")
        with open(staged, "rb") as a, open(BIN, "rb") as b:
            self.assertEqual(a.read(), b.read(), "the staged agent is the bridge's own binary")
        with connected(conn) as kc:
            _, out, _ = run_cell(kc, "import socket; print(socket.gethostname())")
            self.assertEqual(out.strip(), self.fs.info["hosts"]["compute"]["hostname"])
        self.end_and_wait_gone(kid, k["job"]["id"])


class HostKeyMismatch(ServiceCase):
    site_args = {"queue_delay": 0.2}

    def test_changed_host_key_ends_the_kernel_and_its_job(self):
        # The login node's host key changes (reinstalled node, or a man in the middle); the
        # bridge's known_hosts still has the old one.
        self.fs.box.replace_host_key()
        self.fs.push_token(USER)
        status, k = self.create(hub_connection())
        self.assertEqual(status, 201, k)
        k = self.wait_state(k["id"], "ended", timeout=120)
        self.assertEqual(k["end_cause"], "host_key_mismatch", k)
        self.assertIn("SHA256:", k["reason"])  # the fingerprint the operator must check
        self.assertIn(self.fs.info["login_addr"], k["reason"])
        self.wait_nothing_left(k["job"]["id"], timeout=30)


if __name__ == "__main__":
    main()
