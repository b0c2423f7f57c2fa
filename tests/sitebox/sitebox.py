#!/usr/bin/python3
"""The site in a box (network part): three hosts -- hub, login, compute -- for kernel-bridge tests.

netns mode: each host is a network namespace plus a persistent UTS namespace (its own hostname).
hub <-veth-> login <-veth-> compute; login does not forward, so hub cannot reach compute. A real
OpenSSH sshd runs in login and authorizes the bridge's generated key the way an HPC centre would:
forwarding only, and only to the compute node.

loopback mode (fallback where namespaces cannot be made): the three hosts are 127.0.0.1/2/3 of the
root namespace; there is no isolation, so tests needing it call require_netns() and get skipped.

The real Slurm (SiteBox(slurm=True)) is in slurm.py, the exceptions and small process/namespace
helpers in sitebox_base.py; both next to this file, re-exported here where users know them.

Usable as a module (stdlib only; `from sitebox import SiteBox`) and as a CLI (see README.md):
    sitebox.py up --state-dir DIR [--loopback | --netns] [--name PREFIX]
    sitebox.py down --state-dir DIR
    sitebox.py exec --state-dir DIR HOST -- CMD...
SiteBox is meant for one test process at a time (not thread-safe); its socket() helper may be
called from any thread.
"""

import argparse
import atexit
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

from sitebox_base import (NeedsNetns, SiteBoxError, _ancestors, _cmdline, _kill, _pid_alive, _run,
                          _socket_in_netns, _tail, _wait_dead, descendants)
from slurm import COMPUTE2, NeedsSlurm, SlurmMixin, stop_slurm

__all__ = ["SiteBox", "NeedsNetns", "NeedsSlurm", "SiteBoxError", "HOSTS"]

log = logging.getLogger("sitebox")

HOSTS = ("hub", "login", "compute")
SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
READY_TIMEOUT = 15.0  # seconds sshd gets to accept connections before up fails


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

class SiteBox(SlurmMixin):
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


def teardown(info, sshd_popen=None, slurm_procs=None):
    """Remove a site described by `info` (site.json): sshd, processes in its namespaces, the
    namespaces (and with them the veths), the UTS namespace mounts, and the state dir if it was a
    temporary one. Every step is attempted even if an earlier one failed."""
    errors = []
    stop_slurm(info, slurm_procs, errors)
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
