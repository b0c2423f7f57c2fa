"""The whole site in a box for the bridge service: hub / login / compute hosts (tests/sitebox), the
UNICORE-compatible test site in the login host (its jobs run in the compute host), a bridge TOML
configuration for it, and `kernel-bridge serve` in the hub host, plus a small client of the
control API over its Unix socket. Used by the service's integration tests, bench/lifecycle and
scripts/demo.

    with FullSite() as fs:              # brings everything up; tears everything down on exit
        fs.push_token("root", fs.tokens["root"])
        status, body = fs.api("POST", "/v1/kernels", {...})

Run by /usr/bin/python3.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

SRC = os.environ.get("KB_SOURCE_DIR") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("KB_BINARY") or os.path.join(SRC, "build", "kernel-bridge")
PY = "/usr/bin/python3"
sys.path.insert(0, os.path.join(SRC, "tests", "sitebox"))

from sitebox import SiteBox  # noqa: E402

UNICORE_SITE = os.path.join(SRC, "tests", "unicore_site", "unicore_site.py")
UNICORE_PORT = 8080  # inside the login host (netns); a free port on loopback


def toml_str(s):
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def free_port(addr="127.0.0.1"):
    """A TCP port free on `addr` now, in this process's network namespace."""
    s = socket.socket()
    s.bind((addr, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop_gracefully(proc, timeout):
    """SIGTERM, then SIGKILL to its whole process group if it is not gone within `timeout` s
    (for processes started with start_new_session=True)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def exchange(conn, method, path, body=None, headers=None, form=None):
    """One HTTP request on `conn` (closed afterwards): `body` goes as JSON, `form` as a form.
    Returns (status, the parsed JSON answer, or its text when it is not JSON)."""
    try:
        hdrs = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        if "json" in resp.getheader("Content-Type", "") and raw:
            return resp.status, json.loads(raw)
        return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


class FullSite:
    """Site in a box + UNICORE test site + `kernel-bridge serve`.

    users: UNICORE users (uid -> token); the bridge identifies local callers by their Unix user
    name, so the test's own user ("root" as CI runs) must be among them to submit kernels."""

    def __init__(self, state_dir=None, queue_delay=1.0, users=("root", "alice", "bob"),
                 site_name="box", restart_grace="20s", serve=True, extra_site_toml="",
                 log_level="debug", admin_users=(), agent_mode="installed", loopback=None,
                 extra_api_toml="", extra_bridge_toml="", slurm=False, compute_nodes=1):
        self.own_dir = state_dir is None
        self.dir = state_dir or tempfile.mkdtemp(prefix="kb-full-")
        os.makedirs(self.dir, exist_ok=True)
        self.queue_delay = queue_delay
        self.users = list(users)
        self.tokens = {u: f"tok-{u}-{os.urandom(6).hex()}" for u in self.users}
        self.site_name = site_name
        self.restart_grace = restart_grace
        self.want_serve = serve
        self.extra_site_toml = extra_site_toml
        self.log_level = log_level
        self.admin_users = list(admin_users)
        self.extra_api_toml = extra_api_toml  # more [api] keys, e.g. a TCP listener
        self.extra_bridge_toml = extra_bridge_toml  # more [bridge] keys, e.g. on_stop
        self.agent_mode = agent_mode  # "installed" (BIN on the site) or "upload" (staged per job)
        self.loopback = loopback  # SiteBox's choice: None = namespaces where possible
        # slurm=True: the site in a box runs a real Slurm and the UNICORE test site submits to it
        # (raises sitebox.NeedsSlurm, a skip, where Slurm cannot run); queue_delay then holds jobs in
        # Slurm (--hold) rather than in the test site.
        self.slurm = slurm
        self.compute_nodes = compute_nodes
        self.box = None
        self.unicore = None
        self.serve = None
        self._logs = []

    # ---- bring-up -------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def up(self):
        self.box = SiteBox(state_dir=os.path.join(self.dir, "site"), loopback=self.loopback,
                           slurm=self.slurm, compute_nodes=self.compute_nodes)
        self.box.__enter__()
        self.info = self.box.info
        self._start_unicore()
        self.config_path = self.write_config()
        if self.want_serve:
            self.start_serve()

    def _start_unicore(self):
        users = {"users": [
            {"uid": u, "password": f"pw-{u}", "tokens": [t], "groups": ["users", "proj1"],
             "roles": ["user"], "dn": f"CN={u},O=Site in a box"} for u, t in self.tokens.items()],
            "queues": ["batch", "gpus"]}
        self.users_file = os.path.join(self.dir, "unicore-users.json")
        with open(self.users_file, "w") as f:
            json.dump(users, f)
        login = self.info["login_addr"]
        port = UNICORE_PORT if self.box.netns else free_port(login)
        job_prefix = " ".join(self.box.prefix("compute"))
        argv = [PY, UNICORE_SITE, "--users", self.users_file, "--listen", f"{login}:{port}",
                "--site-name", "DEMO-SITE", "--state-dir", os.path.join(self.dir, "unicore"),
                "--queue-delay", str(self.queue_delay)]
        if job_prefix:
            argv += ["--job-prefix", job_prefix]
        env = None
        if self.slurm:
            argv += ["--slurm-conf", self.box.slurm["conf"], "--bss-poll", "0.5"]
            env = self.box.slurm_env()
        log = self._log("unicore-site.log")
        self.unicore = self.box.popen("login", argv, stdout=subprocess.PIPE, stderr=log,
                                      start_new_session=True, env=env)
        line = self.unicore.stdout.readline().decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"UNICORE test site did not start: {line!r}\n"
                               f"{self.tail('unicore-site.log')}")
        self.unicore_url = line.split(" ", 1)[1]
        self.control_url = self.unicore_url.split("/DEMO-SITE/")[0] + "/_control"

    def write_config(self, path=None, **overrides):
        """Writes the bridge's TOML for this site (the layout of etc/kernel-bridge.toml)."""
        i = self.info
        state = os.path.join(self.dir, "bridge-state")
        os.makedirs(state, exist_ok=True)
        self.socket_path = os.path.join(self.dir, "api.sock")
        kernel_argv = [PY, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        # On loopback the node's first address (what the job script picks by default) is not the
        # compute address sshd's permitopen allows: tell the job which one to listen on.
        agent_env = ("" if self.box.netns else
                     f"environment = {{ KB_AGENT_ADDRESS = {toml_str(i['compute_addr'])} }}\n")
        agent_toml = f'{{ mode = {toml_str(self.agent_mode)}, path = {toml_str(BIN)} }}'
        text = f"""# Generated by tests/integration/fullsite.py for the site in a box.
[bridge]
state_dir = {toml_str(state)}
log_level = {toml_str(self.log_level)}
restart_grace = {toml_str(self.restart_grace)}
{self.extra_bridge_toml}

[api]
unix_socket = {toml_str(self.socket_path)}
admin_users = {json.dumps(self.admin_users)}
{self.extra_api_toml}

[[site]]
name = {toml_str(self.site_name)}
description = "site in a box (tests)"
unicore_url = {toml_str(overrides.get('unicore_url', self.unicore_url))}
login_hosts = [{toml_str(f"{i['login_addr']}:{i['ssh_port']}")}]
known_hosts = {toml_str(overrides.get('known_hosts', i['known_hosts']))}
ssh_user = {toml_str(i['ssh_user'])}
ssh_identity = {toml_str(i['identity'])}
ssh_keepalive = "1s"
{agent_env}agent = {agent_toml}
default_kernel = "python3"
{self.extra_site_toml}

[site.kernels]
python3 = {json.dumps(kernel_argv)}

[site.defaults]
queue = "batch"
nodes = 1
runtime = "1h"

[site.limits]
queues = ["batch", "gpus"]
max_nodes = 2
max_runtime = "4h"
max_gpus = 0
"""
        path = path or os.path.join(self.dir, "kernel-bridge.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_serve(self, config=None):
        log = self._log("serve.log")
        self.serve = self.box.popen("hub", [BIN, "--log-level", self.log_level, "serve",
                                            "--config", config or self.config_path],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_api(proc=self.serve)

    def wait_api(self, timeout=30, proc=None, ok=(200, 503)):
        """Until GET /v1/health on socket_path answers with a status in `ok`; RuntimeError (with
        serve.log) when `proc`, the daemon, exits first or the time runs out."""
        deadline = time.time() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"kernel-bridge serve exited with {proc.returncode}:\n"
                                   f"{self.tail('serve.log')}")
            if os.path.exists(self.socket_path):
                try:
                    status, _ = self.api("GET", "/v1/health")
                    if status in ok:
                        return
                except OSError:
                    pass
            if time.time() > deadline:
                raise RuntimeError(f"kernel-bridge serve did not answer on {self.socket_path} in "
                                   f"{timeout} s:\n" + self.tail("serve.log"))
            time.sleep(0.1)

    def stop_serve(self):
        stop_gracefully(self.serve, 60)

    # ---- clients ----------------------------------------------------------------------------
    def api(self, method, path, body=None, timeout=60, headers=None):
        """One request to the control API over the Unix socket, as this process's user."""
        return exchange(UnixHTTPConnection(self.socket_path, timeout=timeout), method, path,
                        body=body, headers=headers)

    def push_token(self, user, token=None):
        status, body = self.api("PUT", f"/v1/users/{user}/credentials",
                                {"token": token or self.tokens[user]})
        if status not in (200, 204):
            raise RuntimeError(f"pushing the token of {user} failed: {status} {body}")

    def control(self, method, path, body=None):
        """The UNICORE test site's control API (faults, held jobs, recorded requests), reached
        from the hub host whatever namespace this process is in."""
        from urllib.parse import urlsplit
        u = urlsplit(self.control_url)
        box = self.box

        class HubConnection(http.client.HTTPConnection):
            def connect(self):
                self.sock = box.connect("hub", u.hostname, u.port, timeout=30)
                self.sock.settimeout(30)

        conn = HubConnection(u.hostname, u.port, timeout=30)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, u.path + path, body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"test site control {method} {path}: {resp.status} {raw[:500]}")
            return json.loads(raw) if raw else None
        finally:
            conn.close()

    def unicore_jobs(self):
        return self.control("GET", "/jobs")

    def compute_pids(self):
        """Pids of processes running in the compute host(s) (netns mode only), not counting the
        site's own slurmd daemons."""
        daemons = set((self.info.get("slurm") or {}).get("slurmd_pids", {}).values())
        pids = []
        for h in ("compute", "compute2"):
            ns = self.info["hosts"].get(h, {}).get("ns")
            if ns:
                r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                pids += [int(p) for p in r.stdout.split() if int(p) not in daemons]
        return pids

    # ---- teardown ---------------------------------------------------------------------------
    def _log(self, name):
        # Appended to: a serve started again (a restart test) keeps what the previous one logged.
        f = open(os.path.join(self.dir, name), "ab")
        self._logs.append(f)
        return f

    def tail(self, name, n=6000):
        try:
            with open(os.path.join(self.dir, name), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def down(self):
        self.stop_serve()
        stop_gracefully(self.unicore, 30)
        if self.box is not None:
            self.box.__exit__(None, None, None)
            self.box = None
        for f in self._logs:
            f.close()
        self._logs = []
        if self.own_dir and not os.environ.get("KB_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    # Manual use: bring the full site up and keep it until Ctrl-C (prints where everything is).
    with FullSite(state_dir=sys.argv[1] if len(sys.argv) > 1 else None) as fs:
        print(json.dumps({"dir": fs.dir, "config": fs.config_path, "socket": fs.socket_path,
                          "unicore_url": fs.unicore_url, "tokens": fs.tokens,
                          "mode": fs.info["mode"]}, indent=2), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
