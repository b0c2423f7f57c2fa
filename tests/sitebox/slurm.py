"""The real Slurm of the site in a box (`SiteBox(slurm=True)`, `sitebox.py up --slurm`): munged in the
root namespace, slurmctld on login, slurmd on compute (and compute2), all per run in
state_dir/slurm/ (slurm.conf, munge key, controller state, spool dirs, logs); start, readiness
waits, stop/start of slurmctld as a fault, and teardown of the daemons. See README.md ("Slurm") and
shared/reference/slurm.md.

SlurmMixin is a base class of sitebox.SiteBox (it uses the site's info, run(), prefix(), _save());
stop_slurm() is called by sitebox.teardown(). Stdlib only; not run by itself."""

import logging
import os
import random
import shutil
import signal
import subprocess
import time

from sitebox_base import NeedsNetns, SiteBoxError, _cmdline, _kill, _pid_alive, _read_pid, _run, _tail, _wait_dead

log = logging.getLogger("sitebox")

COMPUTE2 = "compute2"  # the second compute host, only with SiteBox(slurm=True, compute_nodes=2)
MUNGED, SLURMCTLD, SLURMD = "/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"
MUNGE_RUN_ROOT = "/run/kb-sitebox"  # munged's socket: /run/kb-sitebox/<site name>/munge.sock
SLURM_READY_TIMEOUT = 40.0  # slurmctld answering, every node idle
SLURM_PARTITIONS = ("batch", "gpus")  # the first is the default; the queues fullsite.py publishes
SLURM_CPUS = 2  # per node: one job with --exclusive or 2 one-CPU jobs fill a node


class NeedsSlurm(NeedsNetns):
    """Raised when a test needs the site's real Slurm but Slurm cannot run here (not installed, no
    network namespaces, or its daemons do not come up). Tests turn it into a skip (exit code 77);
    with KB_REQUIRE_SLURM=1 in the environment up() raises SiteBoxError instead (CI that must run it)."""


class SlurmMixin:
    """The Slurm part of SiteBox: info["slurm"], client commands, the daemons' start and stop."""

    @property
    def slurm(self):
        """info["slurm"] (conf, env, nodes, partitions, daemons' pids and logs) or None."""
        return self.info.get("slurm") if self.info else None

    def slurm_env(self, env=None):
        """os.environ (or `env`) plus SLURM_CONF: for Slurm's client commands run on login."""
        out = dict(os.environ if env is None else env)
        out.update(self.info["slurm"]["env"])
        return out

    def slurm_run(self, argv, host="login", **kw):
        """A Slurm client command (squeue, scancel, ...) on `host` (login by default)."""
        kw.setdefault("env", self.slurm_env())
        return self.run(host, argv, **kw)

    def _slurm_impossible(self):
        if not self.netns:
            return "Slurm in the site in a box needs network namespaces; this site runs on loopback (%s)" % \
                self.info.get("loopback_reason", "loopback requested")
        for tool in (MUNGED, SLURMCTLD, SLURMD, "sbatch", "squeue", "scontrol", "scancel", "sinfo"):
            if shutil.which(tool) is None:
                return "%s not found (scripts/bootstrap installs slurm-wlm and munge)" % tool
        return None

    def _needs_slurm(self, reason):
        if os.environ.get("KB_REQUIRE_SLURM") == "1":
            raise SiteBoxError("Slurm is required (KB_REQUIRE_SLURM=1) but cannot run: %s" % reason)
        raise NeedsSlurm(reason)

    def _start_slurm(self):
        """munged (root namespace; its socket is in the state dir, shared by every namespace),
        slurmctld on login, slurmd on each compute host; returns once every node is idle."""
        reason = self._slurm_impossible()
        if reason:
            self._needs_slurm(reason)
        sd = os.path.join(self.info["state_dir"], "slurm")
        for d in ("", "munge", "ctld", "log"):
            os.makedirs(os.path.join(sd, d), exist_ok=True)
        os.chmod(os.path.join(sd, "munge"), 0o700)
        # munged refuses a socket whose directories are not all executable by everyone; a test's state
        # dir usually is private (mkdtemp: 0700), so the socket lives in /run/kb-sitebox/<name>/.
        run_dir = os.path.join(MUNGE_RUN_ROOT, self.name)
        os.makedirs(MUNGE_RUN_ROOT, mode=0o755, exist_ok=True)
        os.makedirs(run_dir, mode=0o755, exist_ok=True)
        os.chmod(run_dir, 0o755)
        computes = [h for h in (("compute", COMPUTE2) if self._compute_nodes == 2 else ("compute",))]
        rnd = random.Random()
        sl = {
            "dir": sd,
            "conf": os.path.join(sd, "slurm.conf"),
            "munge_key": os.path.join(sd, "munge", "munge.key"),
            "munge_run_dir": run_dir,
            "munge_socket": os.path.join(run_dir, "munge.sock"),
            "munged_pidfile": os.path.join(run_dir, "munged.pid"),
            "munged_log": os.path.join(sd, "log", "munged.log"),
            "slurmctld_log": os.path.join(sd, "log", "slurmctld.log"),
            "slurmctld_host": self.info["hosts"]["login"]["hostname"],
            "slurmctld_addr": self.info["hosts"]["login"]["addr_compute_side"],
            # Each host has its own port space, but random ports keep two sites' daemons apart in
            # logs and keep a stray client from reaching the wrong controller.
            "slurmctld_port": rnd.randrange(20000, 29000),
            "slurmd_port": rnd.randrange(29000, 38000),
            "nodes": [self.info["hosts"][h]["hostname"] for h in computes],
            "node_hosts": {self.info["hosts"][h]["hostname"]: h for h in computes},
            "partitions": list(SLURM_PARTITIONS),
            "cpus_per_node": SLURM_CPUS,
            "slurmd_logs": {},
            "munged_pid": None, "slurmctld_pid": None, "slurmd_pids": {},
        }
        sl["env"] = {"SLURM_CONF": sl["conf"]}
        self.info["slurm"] = sl
        self._save()
        with open(sl["munge_key"], "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(os.urandom(1024))
        self._write_slurm_conf()
        self._start_munged()
        self.start_slurmctld()
        for h in computes:
            self._start_slurmd(h)
        self._wait_nodes_idle()
        log.info("site %s: Slurm up: slurmctld on %s (%s:%d), nodes %s, partitions %s", self.name,
                 sl["slurmctld_host"], sl["slurmctld_addr"], sl["slurmctld_port"], ",".join(sl["nodes"]),
                 ",".join(sl["partitions"]))

    def _write_slurm_conf(self):
        sl = self.info["slurm"]
        sd = sl["dir"]
        nodes = []
        for n in sl["nodes"]:
            h = sl["node_hosts"][n]
            nodes.append("NodeName=%s NodeAddr=%s CPUs=%d Boards=1 SocketsPerBoard=1 CoresPerSocket=%d "
                         "ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN"
                         % (n, self.info["hosts"][h]["addr"], SLURM_CPUS, SLURM_CPUS))
        parts = ["PartitionName=%s Nodes=ALL Default=%s MaxTime=INFINITE State=UP"
                 % (p, "YES" if i == 0 else "NO") for i, p in enumerate(sl["partitions"])]
        with open(sl["conf"], "w") as f:
            f.write("\n".join([
                "# generated by tests/sitebox/sitebox.py for site %s (see shared/reference/slurm.md)" % self.name,
                "ClusterName=kbbox",
                "SlurmctldHost=%s(%s)" % (sl["slurmctld_host"], sl["slurmctld_addr"]),
                "SlurmUser=root",
                "SlurmdUser=root",
                "SlurmctldPort=%d" % sl["slurmctld_port"],
                "SlurmdPort=%d" % sl["slurmd_port"],
                "AuthType=auth/munge",
                "CredType=cred/munge",
                "AuthInfo=socket=%s" % sl["munge_socket"],
                "StateSaveLocation=%s/ctld" % sd,
                "SlurmdSpoolDir=%s/spool-%%n" % sd,
                "SlurmctldPidFile=%s/slurmctld.pid" % sd,
                "SlurmdPidFile=%s/slurmd-%%n.pid" % sd,
                "SlurmctldLogFile=%s" % sl["slurmctld_log"],
                "SlurmdLogFile=%s/log/slurmd-%%n.log" % sd,
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SchedulerType=sched/backfill",
                "SchedulerParameters=sched_interval=5,batch_sched_delay=0",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "SlurmdTimeout=60",
                "InactiveLimit=0",
                "KillWait=5",
                # Ended jobs stay visible to scontrol for 10 minutes (there is no accounting database,
                # so sacct has nothing; the test site reads final states with `scontrol show job`).
                "MinJobAge=600",
                "PlugStackConfig=/dev/null",
            ] + nodes + parts) + "\n")
        for n in sl["nodes"]:
            sl["slurmd_logs"][n] = os.path.join(sd, "log", "slurmd-%s.log" % n)

    def _start_munged(self):
        sl = self.info["slurm"]
        p = _run([MUNGED, "--key-file=%s" % sl["munge_key"], "--socket=%s" % sl["munge_socket"],
                  "--pid-file=%s" % sl["munged_pidfile"], "--seed-file=%s" % os.path.join(sl["dir"], "munge", "seed"),
                  "--log-file=%s" % sl["munged_log"], "--num-threads=4"], check=False)
        pid = _read_pid(sl["munged_pidfile"])
        if p.returncode != 0 or pid is None:
            self._needs_slurm("munged did not start (exit %d): %s %s" % (p.returncode, p.stderr.strip(),
                                                                      _tail(sl["munged_log"], 5)))
        sl["munged_pid"] = pid
        self._save()

    def _popen_daemon(self, host, argv, logname):
        logf = open(os.path.join(self.info["slurm"]["dir"], "log", logname), "ab")
        try:
            # nsenter execs the daemon (no pid namespace): the pid is the daemon's. Only the network and
            # UTS namespaces change: `ip netns exec` would remount /sys and slurmd would die on the
            # missing cgroup mount (shared/reference/slurm.md).
            return subprocess.Popen(self.prefix(host) + argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True, env=self.slurm_env())
        finally:
            logf.close()

    def _start_slurmd(self, host):
        sl = self.info["slurm"]
        node = self.info["hosts"][host]["hostname"]
        proc = self._popen_daemon(host, [SLURMD, "-D", "-f", sl["conf"], "-N", node], "slurmd-%s.stdout" % node)
        self._slurm_procs["slurmd-" + node] = proc
        sl["slurmd_pids"][node] = proc.pid
        self._save()

    def start_slurmctld(self):
        """Start slurmctld on login (again, after stop_slurmctld: it reloads its saved state, the jobs
        survive); returns once it answers `scontrol ping`."""
        sl = self.info["slurm"]
        if sl.get("slurmctld_pid") and _pid_alive(sl["slurmctld_pid"]):
            raise SiteBoxError("slurmctld is already running (pid %d)" % sl["slurmctld_pid"])
        proc = self._popen_daemon("login", [SLURMCTLD, "-D", "-f", sl["conf"]], "slurmctld.stdout")
        self._slurm_procs["slurmctld"] = proc
        sl["slurmctld_pid"] = proc.pid
        self._save()
        deadline = time.monotonic() + SLURM_READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                self._needs_slurm("slurmctld exited (%d) during start-up; last lines of %s:\n%s"
                                  % (proc.returncode, sl["slurmctld_log"], _tail(sl["slurmctld_log"], 15)))
            p = self.slurm_run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
            if p.returncode == 0 and " is UP" in p.stdout:
                return
            if time.monotonic() > deadline:
                self._needs_slurm("slurmctld does not answer `scontrol ping` within %.0f s (%s); last lines of "
                                  "%s:\n%s" % (SLURM_READY_TIMEOUT, (p.stdout + p.stderr).strip(),
                                               sl["slurmctld_log"], _tail(sl["slurmctld_log"], 15)))
            time.sleep(0.1)

    def stop_slurmctld(self):
        """Stop slurmctld (SIGTERM: it saves its state and exits). Running jobs go on on the nodes;
        client commands fail until start_slurmctld()."""
        sl = self.info["slurm"]
        pid = sl.get("slurmctld_pid")
        if pid and _pid_alive(pid):
            _kill([pid], signal.SIGTERM)
            if _wait_dead([pid], 15.0):
                _kill([pid])
                _wait_dead([pid], 5.0)
        proc = self._slurm_procs.pop("slurmctld", None)
        if proc is not None:
            proc.wait(timeout=5)
        sl["slurmctld_pid"] = None
        self._save()
        log.info("sitebox %s: slurmctld stopped", self.name)

    def _wait_nodes_idle(self):
        sl = self.info["slurm"]
        deadline = time.monotonic() + SLURM_READY_TIMEOUT
        last = ""
        while True:
            for node, pid in sl["slurmd_pids"].items():
                if not _pid_alive(pid):
                    self._needs_slurm("slurmd on %s exited during start-up; last lines of %s:\n%s"
                                      % (node, sl["slurmd_logs"][node], _tail(sl["slurmd_logs"][node], 15)))
            p = self.slurm_run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
            last = (p.stdout + p.stderr).strip()
            states = dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)
            if p.returncode == 0 and all(states.get(n) == "idle" for n in sl["nodes"]):
                return
            if time.monotonic() > deadline:
                self._needs_slurm("the Slurm nodes are not idle within %.0f s (sinfo: %s); slurmctld log:\n%s"
                                  % (SLURM_READY_TIMEOUT, last, _tail(sl["slurmctld_log"], 15)))
            time.sleep(0.1)


def stop_slurm(info, procs, errors):
    """slurmd(s), slurmctld, munged: SIGTERM, then SIGKILL. The job processes (slurmstepd and what it
    started) live in the compute namespaces and go with everything else there."""
    sl = info.get("slurm")
    if not sl:
        return
    pids = list(sl.get("slurmd_pids", {}).values()) + [sl.get("slurmctld_pid")]
    pids = [p for p in pids if p and _pid_alive(p) and sl["conf"] in _cmdline(p)]
    munged = sl.get("munged_pid")
    if munged and _pid_alive(munged) and sl["munge_socket"] in _cmdline(munged):
        pids.append(munged)
    _kill(pids, signal.SIGTERM)
    left = _wait_dead(pids, 5.0)
    _kill(left)
    left = _wait_dead(left, 5.0)
    for p in (procs or {}).values():
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    if left:
        errors.append("Slurm daemons still alive: %s" % left)
    rd = sl.get("munge_run_dir")
    if rd and os.path.dirname(rd) == MUNGE_RUN_ROOT:
        shutil.rmtree(rd, ignore_errors=True)
