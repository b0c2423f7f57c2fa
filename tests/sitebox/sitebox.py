#!/usr/bin/python3
"""The site in a box (network part): three hosts -- hub, login, compute -- for kernel-bridge tests.

netns mode: each host is a network namespace plus a persistent UTS namespace (its own hostname).
hub <-veth-> login <-veth-> compute; login does not forward, so hub cannot reach compute. A real
OpenSSH sshd runs in login and authorizes the bridge's generated key the way an HPC centre would:
forwarding only, and only to the compute node.

loopback mode (fallback where namespaces cannot be made): the three hosts are 127.0.0.1/2/3 of the
root namespace; there is no isolation, so tests needing it call require_netns() and get skipped.

Usable as a module (stdlib only; `from sitebox import SiteBox`) and as a CLI (see README.md):
    sitebox.py up --state-dir DIR [--loopback | --netns] [--name PREFIX]
    sitebox.py down --state-dir DIR
    sitebox.py exec --state-dir DIR HOST -- CMD...
SiteBox is meant for one test process at a time (not thread-safe); its socket() helper may be
called from any thread.
"""

import argparse
import atexit
import ctypes
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket as _socket
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["SiteBox", "NeedsNetns", "NeedsSlurm", "SiteBoxError", "HOSTS"]

log = logging.getLogger("sitebox")

HOSTS = ("hub", "login", "compute")
COMPUTE2 = "compute2"  # the second compute host, only with SiteBox(slurm=True, compute_nodes=2)
SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
READY_TIMEOUT = 15.0  # seconds sshd gets to accept connections before up fails
MUNGED, SLURMCTLD, SLURMD = "/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"
MUNGE_RUN_ROOT = "/run/kb-sitebox"  # munged's socket: /run/kb-sitebox/<site name>/munge.sock
SLURM_READY_TIMEOUT = 40.0  # slurmctld answering, every node idle
SLURM_PARTITIONS = ("batch", "gpus")  # the first is the default; the queues fullsite.py publishes
SLURM_CPUS = 2  # per node: one job with --exclusive or 2 one-CPU jobs fill a node
CLONE_NEWNET = 0x40000000


class NeedsNetns(Exception):
    """Raised when a test or fault needs isolated hosts but the site runs on loopback.

    Tests turn it into a skip (exit code 77), never into a pass."""


class NeedsSlurm(NeedsNetns):
    """Raised when a test needs the site's real Slurm but Slurm cannot run here (not installed, no
    network namespaces, or its daemons do not come up). Tests turn it into a skip (exit code 77);
    with KB_REQUIRE_SLURM=1 in the environment up() raises SiteBoxError instead (CI that must run it)."""


class SiteBoxError(RuntimeError):
    """The site could not be brought up or operated; the message says what and what to do."""


# ----------------------------------------------------------------------------- small helpers

def _run(argv, check=True, **kw):
    """Run a setup command; on failure raise SiteBoxError with its stderr (setup errors must be legible)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    p = subprocess.run(argv, **kw)
    if check and p.returncode != 0:
        raise SiteBoxError("command failed (exit %d): %s\n%s" % (p.returncode, " ".join(argv), (p.stderr or "").strip()))
    return p


def _tail(path, lines=30):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return "(cannot read %s: %s)" % (path, e)


def _pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead for our purposes


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children_map():
    """ppid -> [pid] for every process (from /proc)."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid):
    """PIDs of every process below pid (a parent before its children)."""
    kids = _children_map()
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _ancestors(pid):
    """pid and all its ancestors (processes teardown must never kill)."""
    out = set()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            with open("/proc/%d/stat" % pid) as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def _kill(pids, sig=signal.SIGKILL):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _wait_dead(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _pid_alive(p)]
    return left


_libc = None


def _setns(path):
    """setns(2) for the calling thread only (network namespaces are per thread)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (path, os.strerror(err)))
    finally:
        os.close(fd)


def _socket_in_netns(ns_path, family, type_):
    """Create a socket inside a network namespace: a short-lived thread enters it, makes the
    socket and ends; the socket stays in that namespace for its whole life, usable from any thread."""
    box = {}

    def work():
        try:
            _setns(ns_path)
            box["sock"] = _socket.socket(family, type_)
        except BaseException as e:  # handed to the caller below
            box["err"] = e

    t = threading.Thread(target=work, name="sitebox-setns")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["sock"]


# Live instances, torn down at interpreter exit or on SIGTERM/SIGHUP even if the test forgot.
_live = set()
_handlers_installed = False


def _teardown_all():
    for sb in list(_live):
        try:
            sb.close()
        except Exception as e:  # teardown must go on for the others
            log.error("sitebox teardown of %s failed: %s", sb.name, e)


def _install_handlers():
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            def handler(signum, frame):
                # Raise so that `with` blocks unwind; atexit catches the rest.
                raise SystemExit(128 + signum)
            signal.signal(sig, handler)
    # Ctrl-C raises KeyboardInterrupt, which unwinds `with` and reaches atexit: nothing to add.


# ----------------------------------------------------------------------------- the site

class SiteBox:
    """Three test hosts with a real sshd on login. Context manager: up on enter, always down on exit.

    Created and used by one test thread; socket()/prefix() may be called from any thread."""

    def __init__(self, state_dir=None, loopback=None, name=None, slurm=False, compute_nodes=1):
        if compute_nodes not in (1, 2):
            raise SiteBoxError("compute_nodes must be 1 or 2, not %r" % (compute_nodes,))
        if compute_nodes == 2 and not slurm:
            raise SiteBoxError("a second compute host exists only for Slurm (SiteBox(slurm=True, compute_nodes=2))")
        self._want_slurm = slurm
        self._compute_nodes = compute_nodes
        self._slurm_procs = {}  # Popen objects of the Slurm daemons we started in this process
        self._want_loopback = loopback
        self._own_state_dir = state_dir is None
        self._state_dir_arg = state_dir
        self._name_arg = name
        self._sshd = None  # Popen of the listener when we started it in this process
        self.info = None
        self._closed = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- properties ------------------------------------------------------------------------
    @property
    def name(self):
        return self.info["name"] if self.info else self._name_arg

    @property
    def state_dir(self):
        return self.info["state_dir"]

    @property
    def netns(self):
        return bool(self.info) and self.info["mode"] == "netns"

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

    def require_netns(self):
        if not self.netns:
            raise NeedsNetns("needs isolated hosts (network namespaces); this site runs on loopback: %s"
                             % self.info.get("loopback_reason", "loopback requested"))

    def addr(self, host):
        return self.info["hosts"][host]["addr"]

    def ns_path(self, host):
        ns = self.info["hosts"][host]["ns"]
        return "/run/netns/%s" % ns if ns else None

    def prefix(self, host):
        """argv to prepend so a command runs on `host` ([] in loopback mode)."""
        h = self.info["hosts"][host]
        if not h["ns"]:
            return []
        return ["nsenter", "--net=/run/netns/%s" % h["ns"], "--uts=%s" % h["uts"], "--"]

    def run(self, host, argv, **kw):
        return subprocess.run(self.prefix(host) + list(argv), **kw)

    def popen(self, host, argv, **kw):
        return subprocess.Popen(self.prefix(host) + list(argv), **kw)

    def socket(self, host, family=_socket.AF_INET, type=_socket.SOCK_STREAM):
        """A socket living in `host`'s network (bind/connect it as that host would)."""
        p = self.ns_path(host)
        if p is None:
            return _socket.socket(family, type)
        return _socket_in_netns(p, family, type)

    def connect(self, host, addr, port, timeout=5.0):
        """TCP connection from `host` to addr:port (raises OSError/socket.timeout like connect)."""
        s = self.socket(host)
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except BaseException:
            s.close()
            raise
        return s

    # -- bring up ----------------------------------------------------------------------------
    def up(self):
        if self.info is not None:
            raise SiteBoxError("this SiteBox is already up")
        _install_handlers()
        if self._own_state_dir:
            state_dir = tempfile.mkdtemp(prefix="kb-sitebox-")
        else:
            state_dir = os.path.abspath(self._state_dir_arg)
            os.makedirs(state_dir, exist_ok=True)
            if os.path.exists(os.path.join(state_dir, "site.json")):
                raise SiteBoxError("%s already holds a site (site.json exists); run `sitebox.py down "
                                   "--state-dir %s` first" % (state_dir, state_dir))
        name = self._name_arg
        while not name or (self._name_arg is None and any(
                os.path.exists("/run/netns/%s-%s" % (name, h)) for h in HOSTS + (COMPUTE2,))):
            name = "kb%d%s" % (os.getpid() % 10000, "".join(random.choice("0123456789abcdef") for _ in range(3)))
        if not all(c.isalnum() or c == "-" for c in name) or len(name) > 24:
            raise SiteBoxError("bad --name %r: use letters, digits and '-', at most 24 characters" % name)
        self.info = {
            "mode": None, "name": name, "state_dir": state_dir, "own_state_dir": self._own_state_dir,
            "hosts": {h: {"ns": None, "uts": None, "addr": None, "hostname": None} for h in self._host_names()},
        }
        _live.add(self)
        try:
            mode, reason = self._choose_mode()
            self.info["mode"] = mode
            if reason:
                self.info["loopback_reason"] = reason
            self._save()
            if mode == "netns":
                self._make_netns()
            else:
                self._make_loopback()
            self._save()
            self._make_keys()
            for attempt in range(3):
                self._write_known_hosts(self.info["known_hosts"])
                self._write_sshd_config()
                try:
                    self._start_sshd()
                    break
                except SiteBoxError as e:
                    # loopback: another process may have taken the free port we picked; pick again
                    if mode != "loopback" or "Address already in use" not in str(e) or attempt == 2:
                        raise
                    self._stop_sshd()
                    self.info["ssh_port"] = self._free_port(self.info["login_addr"])
            self._save()
            if self._want_slurm:
                self._start_slurm()
            log.info("site %s up (%s): hub %s, login %s:%d, compute %s; state %s", name, mode,
                     self.addr("hub"), self.info["login_addr"], self.info["ssh_port"],
                     self.info["compute_addr"], state_dir)
        except BaseException:
            try:
                self.close()
            except Exception as e:  # the start-up error is the one to report
                log.error("sitebox %s: cleanup after failed start-up: %s", name, e)
            raise
        return self.info

    def _host_names(self):
        return HOSTS + ((COMPUTE2,) if self._compute_nodes == 2 else ())

    def _choose_mode(self):
        if self._want_loopback:
            return "loopback", "loopback requested"
        reason = self._netns_impossible()
        if reason is None:
            return "netns", None
        if self._want_loopback is False:
            raise SiteBoxError("network namespaces were required but cannot be made: %s" % reason)
        log.warning("sitebox: falling back to loopback hosts: %s", reason)
        return "loopback", reason

    def _netns_impossible(self):
        if os.geteuid() != 0:
            return "not root (network namespaces, veths and sshd need root)"
        for tool in ("ip", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                return "%s not found" % tool
        probe = "%s-probe" % self.info["name"]
        p = _run(["ip", "netns", "add", probe], check=False)
        _run(["ip", "netns", "del", probe], check=False)  # also after a half-made attempt
        if p.returncode != 0:
            return "`ip netns add` failed: %s" % p.stderr.strip()
        return None

    def _pick_subnet(self):
        """A /24 in 10.199.0.0/16 that no interface here (root or another site's namespace) uses."""
        used = []
        out = _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
        for ns in _run(["ip", "netns", "list"], check=False).stdout.split("\n"):
            ns = ns.split(" ")[0]
            if ns:
                out += _run(["ip", "-n", ns, "-o", "-4", "addr", "show"], check=False).stdout
        for line in out.split("\n"):
            parts = line.split()
            if "inet" in parts:
                try:
                    used.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
                except ValueError:
                    pass
        for _ in range(64):
            net = ipaddress.ip_network("10.199.%d.0/24" % random.randrange(1, 255))
            if not any(net.overlaps(u) for u in used):
                return net
        raise SiteBoxError("no free /24 in 10.199.0.0/16 (all in use on this machine); run `ip netns list` "
                           "and remove stale sites with `sitebox.py down`")

    def _make_netns(self):
        name, sd = self.info["name"], self.info["state_dir"]
        net = self._pick_subnet()
        base = int(net.network_address)
        a = lambda i: str(ipaddress.ip_address(base + i))
        # hub-login: .1/.2 in .0/30; login-compute: .5/.6 in .4/30
        hub_a, login_h, login_c, compute_a = a(1), a(2), a(5), a(6)
        self.info["subnet"] = str(net)
        self.info["hub_login_net"] = "%s/30" % a(0)
        self.info["login_compute_net"] = "%s/30" % a(4)
        addrs = {"hub": hub_a, "login": login_h, "compute": compute_a, COMPUTE2: a(10)}
        for h in self._host_names():
            ns = "%s-%s" % (name, h)
            hostname = "kb-%s-%s" % (h, name)
            uts = os.path.join(sd, "uts-%s" % h)
            hi = self.info["hosts"][h]
            _run(["ip", "netns", "add", ns])
            hi["ns"] = ns
            self._save()
            with open(uts, "w"):
                pass
            # A persistent UTS namespace: unshare bind-mounts it on the file, which keeps it alive.
            _run(["unshare", "--uts=%s" % uts, "hostname", hostname])
            hi["uts"] = uts
            hi["hostname"] = hostname
            hi["addr"] = addrs[h]
            self._save()
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        hub, login, compute = (self.info["hosts"][h]["ns"] for h in HOSTS)
        self.info["hosts"]["login"]["addr_compute_side"] = login_c
        # veths are created directly inside the namespaces: no names in the root namespace to collide.
        _run(["ip", "link", "add", "to-login", "netns", hub, "type", "veth", "peer", "name", "to-hub", "netns", login])
        _run(["ip", "link", "add", "to-compute", "netns", login, "type", "veth", "peer", "name", "to-login", "netns", compute])
        _run(["ip", "-n", hub, "addr", "add", hub_a + "/30", "dev", "to-login"])
        _run(["ip", "-n", login, "addr", "add", login_h + "/30", "dev", "to-hub"])
        _run(["ip", "-n", login, "addr", "add", login_c + "/30", "dev", "to-compute"])
        _run(["ip", "-n", compute, "addr", "add", compute_a + "/30", "dev", "to-login"])
        for ns, dev in ((hub, "to-login"), (login, "to-hub"), (login, "to-compute"), (compute, "to-login")):
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        if self._compute_nodes == 2:
            self._make_compute2(a)
        # login must not route hub<->compute; sshd may bind its address even while the link is down.
        self._sysctl("login", "net/ipv4/ip_forward", "0")
        self._sysctl("login", "net/ipv4/ip_nonlocal_bind", "1")
        # hub even has a route to compute via login, so "hub cannot reach compute" proves login does not forward.
        self._hub_routes()
        for h in self._host_names():
            self.info["hosts"][h]["prefix"] = self.prefix(h)
        self.info["login_addr"] = login_h
        self.info["compute_addr"] = compute_a
        self.info["ssh_port"] = 22

    def _make_compute2(self, a):
        """compute2: its own link to login (login .9 <-> compute2 .10) and a direct link to compute
        (compute .13 <-> compute2 .14), so the two nodes reach each other (srun's I/O, slurmd to
        slurmd) without login forwarding anything. Host routes: compute2 reaches login's
        compute-side address (where slurmctld is) via .9; each node reaches the other's main
        address over the direct link. hub has no route to compute2 at all."""
        login, compute, c2 = (self.info["hosts"][h]["ns"] for h in ("login", "compute", COMPUTE2))
        self.info["login_compute2_net"] = "%s/30" % a(8)
        self.info["compute_compute2_net"] = "%s/30" % a(12)
        self.info["hosts"]["login"]["addr_compute2_side"] = a(9)
        _run(["ip", "link", "add", "to-compute2", "netns", login, "type", "veth", "peer", "name", "to-login", "netns", c2])
        _run(["ip", "link", "add", "to-compute2", "netns", compute, "type", "veth", "peer", "name", "to-compute", "netns", c2])
        for ns, addr, dev in ((login, a(9), "to-compute2"), (c2, a(10), "to-login"),
                              (compute, a(13), "to-compute2"), (c2, a(14), "to-compute")):
            _run(["ip", "-n", ns, "addr", "add", addr + "/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        _run(["ip", "-n", c2, "route", "add", a(5) + "/32", "via", a(9)])
        _run(["ip", "-n", c2, "route", "add", a(6) + "/32", "via", a(13)])
        _run(["ip", "-n", compute, "route", "add", a(10) + "/32", "via", a(14)])

    def _hub_routes(self):
        _run(["ip", "-n", self.info["hosts"]["hub"]["ns"], "route", "replace",
              self.info["login_compute_net"], "via", self.info["hosts"]["login"]["addr"]])

    def _sysctl(self, host, key, value):
        path = "/proc/sys/" + key
        ns = self.info["hosts"][host]["ns"]
        _run(["nsenter", "--net=/run/netns/%s" % ns, "--", "sh", "-c", 'echo %s > %s && cat %s' % (value, path, path)])

    def _make_loopback(self):
        for h, a in zip(HOSTS, ("127.0.0.1", "127.0.0.2", "127.0.0.3")):
            self.info["hosts"][h].update(addr=a, hostname=_socket.gethostname(), prefix=[])
        # Are 127.0.0.2/3 usable here (they are on Linux: all of 127/8 is local)?
        for a in ("127.0.0.2", "127.0.0.3"):
            s = _socket.socket()
            try:
                s.bind((a, 0))
            except OSError as e:
                raise SiteBoxError("loopback mode needs %s to be usable: %s" % (a, e))
            finally:
                s.close()
        self.info["login_addr"] = "127.0.0.2"
        self.info["compute_addr"] = "127.0.0.3"
        self.info["ssh_port"] = self._free_port("127.0.0.2")

    @staticmethod
    def _free_port(addr):
        s = _socket.socket()
        try:
            s.bind((addr, 0))
            return s.getsockname()[1]
        finally:
            s.close()

    def _make_keys(self):
        sd = self.info["state_dir"]
        kd = os.path.join(sd, "ssh")
        os.makedirs(kd, mode=0o700, exist_ok=True)
        ident = os.path.join(kd, "bridge_ed25519")
        hostkey = os.path.join(kd, "ssh_host_ed25519_key")
        for path, comment in ((ident, "kernel-bridge@%s" % self.info["name"]), (hostkey, "login@%s" % self.info["name"])):
            _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
        self.info["identity"] = ident
        self.info["identity_pub"] = ident + ".pub"
        self.info["host_key"] = hostkey
        self.info["host_key_pub"] = hostkey + ".pub"
        self.info["ssh_user"] = "root"
        # The way an HPC centre authorizes a service key: forwarding only, only to the compute node,
        # and no command (command= makes `ssh login id` run /bin/false instead of `id`).
        with open(ident + ".pub") as f:
            pub = f.read().strip()
        ak = os.path.join(kd, "authorized_keys")
        # Every compute host: a second one exists only with Slurm, where a job may land on either.
        targets = [self.info["compute_addr"]] + [self.info["hosts"][h]["addr"] for h in self._host_names()
                                                 if h == COMPUTE2 and self.info["hosts"][h]["addr"]]
        with open(ak, "w") as f:
            f.write('restrict,port-forwarding,%s,command="/bin/false" %s\n'
                    % (",".join('permitopen="%s:*"' % t for t in targets), pub))
        self.info["authorized_keys"] = ak
        self.info["known_hosts"] = os.path.join(sd, "known_hosts")

    def _write_known_hosts(self, path):
        with open(self.info["host_key_pub"]) as f:
            keytype, key = f.read().split()[:2]
        port, addr = self.info["ssh_port"], self.info["login_addr"]
        host = addr if port == 22 else "[%s]:%d" % (addr, port)
        with open(path, "w") as f:
            f.write("%s %s %s\n" % (host, keytype, key))
        return path

    def _write_sshd_config(self):
        sd = self.info["state_dir"]
        cfg = os.path.join(sd, "sshd_config")
        self.info["sshd_config"] = cfg
        self.info["sshd_log"] = os.path.join(sd, "sshd.log")
        self.info["sshd_pidfile"] = os.path.join(sd, "sshd.pid")
        with open(cfg, "w") as f:
            f.write("\n".join([
                "# generated by tests/sitebox/sitebox.py for site %s" % self.info["name"],
                "ListenAddress %s:%d" % (self.info["login_addr"], self.info["ssh_port"]),
                "HostKey %s" % self.info["host_key"],
                "PidFile %s" % self.info["sshd_pidfile"],
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "StrictModes no",
                "AuthorizedKeysFile %s" % self.info["authorized_keys"],
                "AllowTcpForwarding yes",
                "AllowAgentForwarding no",
                "X11Forwarding no",
                "PermitTTY no",
                "MaxStartups 1000",
                "MaxSessions 1000",
                "MaxAuthTries 6",
                "UseDNS no",
                "LogLevel VERBOSE",
                "PrintMotd no",
                "",
            ]))

    def _start_sshd(self):
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        except OSError as e:
            raise SiteBoxError("sshd needs its privilege-separation dir /run/sshd: %s (run as root)" % e)
        t = _run([SSHD, "-t", "-f", self.info["sshd_config"]], check=False)
        if t.returncode != 0:
            raise SiteBoxError("sshd rejects its config %s: %s" % (self.info["sshd_config"], t.stderr.strip()))
        logf = open(self.info["sshd_log"], "ab")
        try:
            # nsenter execs sshd (no fork without a pid namespace), so this pid is the listener's.
            self._sshd = subprocess.Popen(
                self.prefix("login") + [SSHD, "-D", "-f", self.info["sshd_config"], "-E", self.info["sshd_log"]],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True)
        finally:
            logf.close()
        self.info["sshd_pid"] = self._sshd.pid
        self._save()
        self._wait_sshd_ready()

    def _wait_sshd_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not _pid_alive(self.info["sshd_pid"]):
                raise SiteBoxError("sshd exited during start-up; last lines of %s:\n%s"
                                   % (self.info["sshd_log"], _tail(self.info["sshd_log"])))
            try:
                s = self.connect("hub", self.info["login_addr"], self.info["ssh_port"], timeout=1.0)
                try:
                    banner = s.recv(64)
                finally:
                    s.close()
                if banner.startswith(b"SSH-"):
                    return
                last = "unexpected banner %r" % banner
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise SiteBoxError("sshd did not accept connections on %s:%d from hub within %.0f s (last error: %s); "
                           "last lines of %s:\n%s" % (self.info["login_addr"], self.info["ssh_port"], timeout, last,
                                                      self.info["sshd_log"], _tail(self.info["sshd_log"])))

    def _save(self):
        sd = self.info["state_dir"]
        tmp = os.path.join(sd, "site.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.info, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, os.path.join(sd, "site.json"))


    # -- Slurm -----------------------------------------------------------------------------------
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

    # -- faults ------------------------------------------------------------------------------
    def sshd_sessions(self):
        """pids of the per-connection sshd processes (all descendants of the listener)."""
        pid = self.info.get("sshd_pid")
        return descendants(pid) if pid else []

    def kill_sshd_sessions(self):
        """SIGKILL every per-connection sshd process (the listener's descendants), not the listener.
        Returns the pids killed. Clients see their connection die without a goodbye."""
        pids = self.sshd_sessions()
        _kill(pids)
        left = _wait_dead(pids)
        if left:
            raise SiteBoxError("sshd session processes %s survived SIGKILL" % left)
        log.info("sitebox %s: killed sshd sessions %s", self.name, pids)
        return pids

    def _stop_sshd(self):
        pid = self.info.get("sshd_pid")
        if not pid:
            return
        sessions = descendants(pid)  # collect before the listener dies and they get reparented
        _kill(sessions)
        if _pid_alive(pid) and self._is_our_sshd(pid):
            _kill([pid], signal.SIGTERM)
            if _wait_dead([pid], 5.0):
                _kill([pid])
                _wait_dead([pid], 5.0)
        if self._sshd is not None:
            try:
                self._sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._sshd = None
        _wait_dead(sessions)
        self.info["sshd_pid"] = None

    def _is_our_sshd(self, pid):
        if self._sshd is not None and self._sshd.pid == pid:
            return True
        return self.info.get("sshd_config", "\0") in _cmdline(pid)

    def restart_sshd(self):
        """Stop the listener and all sessions, start sshd again with the same host key and port,
        and return once it accepts connections."""
        self._stop_sshd()
        self._start_sshd()
        self._save()
        log.info("sitebox %s: sshd restarted (pid %d)", self.name, self.info["sshd_pid"])

    def link_down(self):
        """Take the hub<->login veth down (both ends): packets are lost, TCP connections stay open."""
        self.require_netns()
        self._run_ip("hub", "link", "set", "to-login", "down")
        self._run_ip("login", "link", "set", "to-hub", "down")
        log.info("sitebox %s: hub<->login link down", self.name)

    def link_up(self):
        """Bring the hub<->login veth back and restore hub's routes; returns once hub reaches sshd."""
        self.require_netns()
        self._run_ip("login", "link", "set", "to-hub", "up")
        self._run_ip("hub", "link", "set", "to-login", "up")
        self._hub_routes()  # the kernel dropped the gateway route while the link was down
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.connect("hub", self.info["login_addr"], self.info["ssh_port"], timeout=1.0).close()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise SiteBoxError("hub cannot reach login's sshd after link_up: %s" % e)
                time.sleep(0.05)
        log.info("sitebox %s: hub<->login link up", self.name)

    def _run_ip(self, host, *args):
        _run(["ip", "-n", self.info["hosts"][host]["ns"]] + list(args))

    def replace_host_key(self):
        """Give the login sshd a new host key and restart it. info['known_hosts'] keeps the OLD key,
        so clients using it must refuse; returns the path of a known_hosts file with the NEW key."""
        hk = self.info["host_key"]
        for p in (hk, hk + ".pub"):
            if os.path.exists(p):
                os.unlink(p)
        _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "login-new@%s" % self.name, "-f", hk])
        self.restart_sshd()
        path = self._write_known_hosts(os.path.join(self.info["state_dir"], "known_hosts.new"))
        log.info("sitebox %s: host key replaced", self.name)
        return path

    # -- tear down -----------------------------------------------------------------------------
    def close(self):
        """Tear everything down; idempotent and safe after a partial up."""
        if self.info is None or self._closed:
            return
        try:
            teardown(self.info, sshd_popen=self._sshd, slurm_procs=self._slurm_procs)
        except SiteBoxError:
            self._closed = True  # tried everything; the error says what is left
            _live.discard(self)
            raise
        # (interrupted by a signal: stays live, so the atexit hook tries again)
        self._closed = True
        _live.discard(self)
        self._sshd = None

    down = close


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _stop_slurm(info, procs, errors):
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


def teardown(info, sshd_popen=None, slurm_procs=None):
    """Remove a site described by `info` (site.json): sshd, processes in its namespaces, the
    namespaces (and with them the veths), the UTS namespace mounts, and the state dir if it was a
    temporary one. Every step is attempted even if an earlier one failed."""
    errors = []
    _stop_slurm(info, slurm_procs, errors)
    pid = info.get("sshd_pid")
    if pid:
        sessions = descendants(pid)
        _kill(sessions)
        mine = (sshd_popen is not None and sshd_popen.pid == pid) or info.get("sshd_config", "\0") in _cmdline(pid)
        if _pid_alive(pid) and mine:
            _kill([pid], signal.SIGTERM)
            if _wait_dead([pid], 3.0):
                _kill([pid])
        if sshd_popen is not None:
            try:
                sshd_popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append("sshd %d did not exit" % pid)
        left = _wait_dead([pid] + sessions, 5.0) if mine else _wait_dead(sessions, 5.0)
        if left:
            errors.append("processes still alive: %s" % left)
    hosts = info.get("hosts", {})
    spare = _ancestors(os.getpid())
    # Anything still running in the namespaces (agents, kernels, listeners a test forgot).
    for h in hosts:
        ns = hosts.get(h, {}).get("ns")
        if not ns:
            continue
        for attempt in range(3):
            p = _run(["ip", "netns", "pids", ns], check=False)
            # Never ourselves: a test process may have setns()ed into hub to act as a client there.
            pids = [int(x) for x in p.stdout.split() if x.isdigit() and int(x) not in spare]
            if not pids:
                break
            _kill(pids)
            _wait_dead(pids, 3.0)
    for h in hosts:
        hi = hosts.get(h, {})
        ns = hi.get("ns")
        if ns and os.path.exists("/run/netns/%s" % ns):
            p = _run(["ip", "netns", "del", ns], check=False)
            if p.returncode != 0:
                errors.append("ip netns del %s: %s" % (ns, p.stderr.strip()))
        uts = hi.get("uts")
        if uts and os.path.exists(uts):
            if os.path.ismount(uts) or _is_nsfs_mount(uts):
                p = _run(["umount", uts], check=False)
                if p.returncode != 0:
                    p = _run(["umount", "-l", uts], check=False)
                    if p.returncode != 0:
                        errors.append("umount %s: %s" % (uts, p.stderr.strip()))
            try:
                os.unlink(uts)
            except OSError as e:
                errors.append("rm %s: %s" % (uts, e))
    sd = info.get("state_dir")
    if sd and os.path.isdir(sd):
        if info.get("own_state_dir") and not os.environ.get("KB_SITEBOX_KEEP"):
            shutil.rmtree(sd, ignore_errors=True)
        else:
            for f in ("site.json",):
                try:
                    os.unlink(os.path.join(sd, f))
                except FileNotFoundError:
                    pass
    if errors:
        log.error("sitebox %s: teardown incomplete: %s", info.get("name"), "; ".join(errors))
        raise SiteBoxError("teardown of site %s incomplete: %s" % (info.get("name"), "; ".join(errors)))
    log.info("sitebox %s: down", info.get("name"))


def _is_nsfs_mount(path):
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == real:
                    return True
    except OSError:
        pass
    return False


def load(state_dir):
    """site.json of a running site (for other processes)."""
    path = os.path.join(state_dir, "site.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SiteBoxError("no site in %s (no site.json); bring one up with `sitebox.py up --state-dir %s`"
                           % (state_dir, state_dir))
    except ValueError as e:
        raise SiteBoxError("%s is not valid JSON (%s); remove it by hand after checking `ip netns list`" % (path, e))


def attach(state_dir):
    """A SiteBox object for a site brought up by another process (exit does NOT tear it down
    unless you call close())."""
    sb = SiteBox(state_dir=state_dir)
    sb.info = load(state_dir)
    return sb


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(prog="sitebox.py", description="kernel-bridge site in a box (hub, login, compute)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="bring a site up; prints site.json")
    u.add_argument("--state-dir", required=True)
    g = u.add_mutually_exclusive_group()
    g.add_argument("--loopback", action="store_true", help="hosts are 127.0.0.1/2/3 (no isolation)")
    g.add_argument("--netns", action="store_true", help="fail instead of falling back to loopback")
    u.add_argument("--name", help="instance name prefix (namespaces are NAME-hub, NAME-login, NAME-compute)")
    u.add_argument("--slurm", action="store_true", help="also a real Slurm: munged, slurmctld on login, slurmd on compute")
    u.add_argument("--compute-nodes", type=int, choices=(1, 2), default=1,
                   help="with --slurm: 2 adds the host compute2 as a second Slurm node")
    d = sub.add_parser("down", help="tear a site down (idempotent)")
    d.add_argument("--state-dir", required=True)
    e = sub.add_parser("exec", help="run a command on a host: exec --state-dir DIR HOST -- CMD...")
    e.add_argument("--state-dir", required=True)
    e.add_argument("host", choices=HOSTS + (COMPUTE2,))
    e.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="sitebox: %(message)s", stream=sys.stderr)
    try:
        if args.cmd == "up":
            loopback = True if args.loopback else (False if args.netns else None)
            sb = SiteBox(state_dir=args.state_dir, loopback=loopback, name=args.name, slurm=args.slurm,
                         compute_nodes=args.compute_nodes)
            try:
                info = sb.up()
            except NeedsSlurm as ex:
                print("sitebox: Slurm cannot run here: %s" % ex, file=sys.stderr)
                return 77
            _live.discard(sb)  # the site outlives this process; `down` removes it
            sb._sshd = None
            sb._slurm_procs = {}
            json.dump(info, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        if args.cmd == "down":
            path = os.path.join(args.state_dir, "site.json")
            if not os.path.exists(path):
                log.info("no site.json in %s: nothing to tear down", args.state_dir)
                return 0
            teardown(load(args.state_dir))
            return 0
        if args.cmd == "exec":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                ap.error("exec needs a command after --")
            sb = attach(args.state_dir)
            full = sb.prefix(args.host) + cmd
            if sb.slurm:
                os.environ.update(sb.slurm["env"])  # Slurm's client commands find this site's cluster
            os.execvp(full[0], full)
    except SiteBoxError as ex:
        print("sitebox: error: %s" % ex, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
