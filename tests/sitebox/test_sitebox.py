#!/usr/bin/python3
"""Tests of the site in a box: isolation, hostnames, the centre's key restrictions (through the real
OpenSSH client), each fault injection, and clean teardown.

    test_sitebox.py --netns     isolation tests; exit 77 (skipped) where namespaces cannot be made
    test_sitebox.py --loopback  the loopback fallback
    test_sitebox.py --slurm     a real Slurm across the hosts (2 nodes); exit 77 where Slurm cannot run
Any skipped test makes the exit code 77, so ctest reports "skipped", never "passed".
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sitebox  # noqa: E402
from sitebox import NeedsNetns, SiteBox  # noqa: E402

SITEBOX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sitebox.py")
PY = "/usr/bin/python3"
WAIT = 15.0  # bound for things that should happen promptly (not a timing assertion)


def netns_or_skip(sb):
    try:
        sb.require_netns()
    except NeedsNetns as e:
        raise unittest.SkipTest(str(e))


def ssh_argv(sb, *options, known_hosts=None, command=()):
    i = sb.info
    return ["ssh", "-F", "/dev/null", "-i", i["identity"], "-p", str(i["ssh_port"]),
            "-o", "UserKnownHostsFile=" + (known_hosts or i["known_hosts"]),
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
            *options, "%s@%s" % (i["ssh_user"], i["login_addr"]), *command]


class EchoServer:
    """A TCP echo server on one of the site's hosts (runs in a thread of this process)."""

    def __init__(self, sb, host, addr, banner=b""):
        self.sock = sb.socket(host)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        self.accepted = 0
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c):
        try:
            if self.banner:
                c.sendall(self.banner)
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            break
        buf += d
    return buf


class Forward:
    """`ssh -N -L <unix socket>:<addr>:<port>` run on hub: the way a client tunnels to compute."""

    def __init__(self, tc, sb, addr, port, known_hosts=None):
        self.path = os.path.join(sb.info["state_dir"], "fwd-%d-%d.sock" % (port, time.monotonic_ns()))
        self.err = tempfile.TemporaryFile()
        self.proc = sb.popen("hub", ssh_argv(sb, "-N", "-o", "ExitOnForwardFailure=yes",
                                             "-o", "StreamLocalBindUnlink=yes",
                                             "-L", "%s:%s:%d" % (self.path, addr, port), known_hosts=known_hosts),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err)
        tc.addCleanup(self.close)
        deadline = time.monotonic() + WAIT
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                tc.fail("ssh -N -L exited with %d before forwarding: %s" % (self.proc.returncode, self.stderr()))
            if time.monotonic() > deadline:
                tc.fail("ssh -N -L did not create its socket within %.0f s: %s" % (WAIT, self.stderr()))
            time.sleep(0.02)

    def connect(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(WAIT)
        s.connect(self.path)
        return s

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


class SiteChecks:
    """Checks that hold in both modes. Subclasses set self.sb (a running SiteBox)."""

    def check_round_trip(self, fwd, payload=b"hello compute\n" * 1000):
        s = fwd.connect()
        try:
            s.sendall(payload)
            self.assertEqual(recv_exactly(s, len(payload)), payload)
        finally:
            s.close()

    def test_hub_reaches_login_sshd(self):
        s = self.sb.connect("hub", self.sb.info["login_addr"], self.sb.info["ssh_port"])
        try:
            s.settimeout(WAIT)
            self.assertTrue(s.recv(64).startswith(b"SSH-2.0-OpenSSH"))
        finally:
            s.close()

    def test_forward_to_compute_round_trips(self):
        srv = EchoServer(self.sb, "compute", self.sb.info["compute_addr"])
        self.addCleanup(srv.close)
        fwd = Forward(self, self.sb, self.sb.info["compute_addr"], srv.port)
        self.check_round_trip(fwd)
        self.assertEqual(srv.accepted, 1)

    def test_forward_elsewhere_refused_by_permitopen(self):
        # A service on login's loopback that login itself reaches, so only permitopen can stop the forward.
        srv = EchoServer(self.sb, "login", "127.0.0.1", banner=b"secret\n")
        self.addCleanup(srv.close)
        direct = self.sb.connect("login", "127.0.0.1", srv.port)
        direct.settimeout(WAIT)
        self.assertEqual(recv_exactly(direct, 7), b"secret\n")
        direct.close()
        fwd = Forward(self, self.sb, "127.0.0.1", srv.port)
        s = fwd.connect()
        try:
            self.assertEqual(s.recv(64), b"", "the forward to 127.0.0.1 must carry nothing")
        finally:
            s.close()
        self.assertEqual(srv.accepted, 1, "only the direct connection may have reached the service")
        deadline = time.monotonic() + WAIT
        while "administratively prohibited" not in fwd.stderr() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertIn("administratively prohibited", fwd.stderr())

    def test_shell_command_refused(self):
        p = self.sb.run("hub", ssh_argv(self.sb, command=["id"]), capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertNotIn("uid=", p.stdout)
        with open(self.sb.info["sshd_log"]) as f:
            self.assertIn("forced-command", f.read())

    def test_unknown_host_refused(self):
        empty = os.path.join(self.sb.info["state_dir"], "empty_known_hosts")
        open(empty, "w").close()
        p = self.sb.run("hub", ssh_argv(self.sb, "-N", known_hosts=empty), capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 255)
        self.assertIn("Host key verification failed", p.stderr)

    def test_known_hosts_names_login(self):
        i = self.sb.info
        with open(i["known_hosts"]) as f:
            host, keytype, key = f.read().split()
        want = i["login_addr"] if i["ssh_port"] == 22 else "[%s]:%d" % (i["login_addr"], i["ssh_port"])
        self.assertEqual(host, want)
        with open(i["host_key_pub"]) as f:
            self.assertEqual(f.read().split()[:2], [keytype, key])
        with open(i["authorized_keys"]) as f:
            line = f.read()
        self.assertTrue(line.startswith('restrict,port-forwarding,permitopen="%s:*"' % i["compute_addr"]), line)
        with open(i["identity_pub"]) as f:
            self.assertIn(f.read().split()[1], line)

    def test_site_json_matches_info(self):
        with open(os.path.join(self.sb.info["state_dir"], "site.json")) as f:
            self.assertEqual(json.load(f), self.sb.info)


class NetnsSite(SiteChecks, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sb = SiteBox()
        cls.sb.up()
        if not cls.sb.netns:
            reason = cls.sb.info.get("loopback_reason")
            cls.sb.close()
            raise unittest.SkipTest("network namespaces unavailable: %s" % reason)

    @classmethod
    def tearDownClass(cls):
        cls.sb.close()

    def test_login_reaches_compute(self):
        srv = EchoServer(self.sb, "compute", self.sb.info["compute_addr"])
        self.addCleanup(srv.close)
        s = self.sb.connect("login", self.sb.info["compute_addr"], srv.port)
        try:
            s.settimeout(WAIT)
            s.sendall(b"ping")
            self.assertEqual(recv_exactly(s, 4), b"ping")
        finally:
            s.close()

    def test_hub_cannot_reach_compute(self):
        srv = EchoServer(self.sb, "compute", self.sb.info["compute_addr"])
        self.addCleanup(srv.close)
        # hub even routes compute's subnet via login; login must drop (not forward, not refuse).
        with self.assertRaises(OSError) as cm:
            self.sb.connect("hub", self.sb.info["compute_addr"], srv.port, timeout=2.0).close()
        self.assertNotIsInstance(cm.exception, ConnectionRefusedError)
        self.assertEqual(srv.accepted, 0)
        # ...and the compute-side address of login is not a way round it for ports on compute.
        r = self.sb.run("login", ["cat", "/proc/sys/net/ipv4/ip_forward"], capture_output=True, text=True)
        self.assertEqual(r.stdout.strip(), "0")

    def test_hosts_see_their_own_hostname(self):
        names = set()
        for h in sitebox.HOSTS:
            want = self.sb.info["hosts"][h]["hostname"]
            r = self.sb.run(h, ["hostname"], capture_output=True, text=True, check=True)
            self.assertEqual(r.stdout.strip(), want)
            names.add(want)
        r = self.sb.run("compute", [PY, "-c", "import socket; print(socket.gethostname())"],
                        capture_output=True, text=True, check=True)
        self.assertEqual(r.stdout.strip(), self.sb.info["hosts"]["compute"]["hostname"])
        self.assertEqual(len(names), 3)
        self.assertNotIn(socket.gethostname(), names, "the root namespace's hostname must be untouched")

    def test_hosts_are_separate_networks(self):
        for h in sitebox.HOSTS:
            r = self.sb.run(h, ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True)
            self.assertIn(self.sb.info["hosts"][h]["addr"] + "/", r.stdout)
            self.assertIn("127.0.0.1/8", r.stdout)  # lo is up
        r = self.sb.run("hub", ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True)
        self.assertNotIn(self.sb.info["compute_addr"] + "/", r.stdout)


class Faults(unittest.TestCase):
    """Each fault on a fresh site (faults change it)."""

    def setUp(self):
        self.sb = SiteBox()
        self.sb.up()
        self.addCleanup(self.sb.close)
        self.srv = EchoServer(self.sb, "compute", self.sb.info["compute_addr"])
        self.addCleanup(self.srv.close)

    def echo(self, s, payload):
        s.sendall(payload)
        self.assertEqual(recv_exactly(s, len(payload)), payload)

    def test_kill_sshd_sessions(self):
        fwd = Forward(self, self.sb, self.sb.info["compute_addr"], self.srv.port)
        s = fwd.connect()
        self.addCleanup(s.close)
        self.echo(s, b"before")
        listener = self.sb.info["sshd_pid"]
        killed = self.sb.kill_sshd_sessions()
        self.assertTrue(killed)
        self.assertNotIn(listener, killed)
        self.assertEqual(fwd.proc.wait(timeout=WAIT), 255)  # the client saw its connection die
        self.assertEqual(s.recv(64), b"")
        self.assertTrue(sitebox._pid_alive(listener))
        self.assertEqual(self.sb.sshd_sessions(), [])
        fwd2 = Forward(self, self.sb, self.sb.info["compute_addr"], self.srv.port)  # listener still serves
        s2 = fwd2.connect()
        self.addCleanup(s2.close)
        self.echo(s2, b"after")

    def test_restart_sshd_same_key_and_port(self):
        fwd = Forward(self, self.sb, self.sb.info["compute_addr"], self.srv.port)
        s = fwd.connect()
        self.addCleanup(s.close)
        self.echo(s, b"before")
        old = self.sb.info["sshd_pid"]
        self.sb.restart_sshd()
        self.assertNotEqual(self.sb.info["sshd_pid"], old)
        self.assertFalse(sitebox._pid_alive(old))
        self.assertEqual(fwd.proc.wait(timeout=WAIT), 255)
        fwd2 = Forward(self, self.sb, self.sb.info["compute_addr"], self.srv.port)  # old known_hosts still valid
        s2 = fwd2.connect()
        self.addCleanup(s2.close)
        self.echo(s2, b"after")

    def test_link_down_and_up(self):
        netns_or_skip(self.sb)
        fwd = Forward(self, self.sb, self.sb.info["compute_addr"], self.srv.port)
        s = fwd.connect()
        self.addCleanup(s.close)
        self.echo(s, b"before")
        self.sb.link_down()
        with self.assertRaises(OSError):
            self.sb.connect("hub", self.sb.info["login_addr"], self.sb.info["ssh_port"], timeout=1.0).close()
        s.sendall(b"during")  # goes into the TCP send queue; must arrive once the link is back
        self.sb.link_up()
        self.assertEqual(recv_exactly(s, 6), b"during")
        self.assertIsNone(fwd.proc.poll(), "the SSH connection must survive a short outage")
        self.sb.connect("hub", self.sb.info["login_addr"], self.sb.info["ssh_port"]).close()
        # The hub keeps its route to compute's subnet (so isolation still rests on login not forwarding).
        r = self.sb.run("hub", ["ip", "route"], capture_output=True, text=True, check=True)
        self.assertIn(self.sb.info["login_compute_net"], r.stdout)

    def test_replace_host_key(self):
        new_kh = self.sb.replace_host_key()
        p = self.sb.run("hub", ssh_argv(self.sb, "-N"), capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 255)
        self.assertIn("REMOTE HOST IDENTIFICATION HAS CHANGED", p.stderr)
        fwd = Forward(self, self.sb, self.sb.info["compute_addr"], self.srv.port, known_hosts=new_kh)
        s = fwd.connect()
        self.addCleanup(s.close)
        self.echo(s, b"new key")


class Lifecycle(unittest.TestCase):
    def test_teardown_leaves_nothing_even_on_failure(self):
        class Boom(Exception):
            pass

        with self.assertRaises(Boom):
            with SiteBox() as sb:
                netns_or_skip(sb)
                info = dict(sb.info)
                stray = sb.popen("compute", ["sleep", "1000"])
                raise Boom()
        stray.wait(timeout=WAIT)  # killed by the teardown (it ran in compute)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for h in sitebox.HOSTS:
            self.assertNotIn(info["hosts"][h]["ns"], listed)
        self.assertFalse(sitebox._pid_alive(info["sshd_pid"]))
        self.assertFalse(os.path.exists(info["state_dir"]))
        with open("/proc/self/mountinfo") as f:
            self.assertNotIn(info["state_dir"], f.read())

    def test_teardown_spares_a_process_that_entered_a_host(self):
        # Integration tests setns() their own process into hub; teardown must not kill it.
        script = (
            "import sys, ctypes, os, subprocess\n"
            "sys.path.insert(0, %r)\n"
            "from sitebox import SiteBox\n"
            "sb = SiteBox(); sb.up()\n"
            "if not sb.netns: sb.close(); sys.exit(77)\n"
            "fd = os.open(sb.ns_path('hub'), os.O_RDONLY)\n"
            "assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0\n"
            "stray = sb.popen('hub', ['sleep', '1000'])\n"
            "ns = sb.info['hosts']['hub']['ns']\n"
            "sb.close()\n"
            "stray.wait(timeout=10)\n"
            "assert ns not in subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True).stdout\n"
            "print('survived')\n" % os.path.dirname(SITEBOX))
        p = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=120)
        if p.returncode == 77:
            self.skipTest("network namespaces unavailable")
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "survived"), p.stderr)

    def test_cli_up_exec_down(self):
        with tempfile.TemporaryDirectory() as d:
            up = subprocess.run([PY, SITEBOX, "up", "--state-dir", d], capture_output=True, text=True, timeout=120)
            try:
                self.assertEqual(up.returncode, 0, up.stderr)
                info = json.loads(up.stdout)
                with open(os.path.join(d, "site.json")) as f:
                    self.assertEqual(json.load(f), info)
                r = subprocess.run([PY, SITEBOX, "exec", "--state-dir", d, "compute", "--", "hostname"],
                                   capture_output=True, text=True, timeout=60)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual(r.stdout.strip(), info["hosts"]["compute"]["hostname"])
                again = subprocess.run([PY, SITEBOX, "up", "--state-dir", d], capture_output=True, text=True)
                self.assertNotEqual(again.returncode, 0)
                self.assertIn("down", again.stderr)
            finally:
                down = subprocess.run([PY, SITEBOX, "down", "--state-dir", d], capture_output=True, text=True)
            self.assertEqual(down.returncode, 0, down.stderr)
            self.assertFalse(sitebox._pid_alive(info["sshd_pid"]))
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            for h in sitebox.HOSTS:
                if info["hosts"][h]["ns"]:
                    self.assertNotIn(info["hosts"][h]["ns"], listed)
            down2 = subprocess.run([PY, SITEBOX, "down", "--state-dir", d], capture_output=True, text=True)
            self.assertEqual(down2.returncode, 0, down2.stderr)
            self.assertTrue(os.path.exists(os.path.join(d, "sshd.log")), "a named state dir keeps its logs")

    def test_two_sites_in_parallel_do_not_collide(self):
        with SiteBox() as a, SiteBox() as b:
            netns_or_skip(a)
            self.assertNotEqual(a.name, b.name)
            self.assertNotEqual(a.info["subnet"], b.info["subnet"])
            for sb in (a, b):
                s = sb.connect("hub", sb.info["login_addr"], sb.info["ssh_port"])
                s.settimeout(WAIT)
                self.assertTrue(s.recv(64).startswith(b"SSH-2.0"))
                s.close()


class LoopbackSite(SiteChecks, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sb = SiteBox(loopback=True)
        cls.sb.up()

    @classmethod
    def tearDownClass(cls):
        pid = cls.sb.info["sshd_pid"]
        cls.sb.close()
        assert not sitebox._pid_alive(pid), "loopback teardown left sshd running"

    def test_mode_and_addresses(self):
        i = self.sb.info
        self.assertEqual(i["mode"], "loopback")
        self.assertFalse(self.sb.netns)
        self.assertEqual([i["hosts"][h]["addr"] for h in sitebox.HOSTS], ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        self.assertEqual(self.sb.prefix("compute"), [])
        self.assertNotEqual(i["ssh_port"], 22)

    def test_isolation_faults_need_netns(self):
        with self.assertRaises(NeedsNetns):
            self.sb.require_netns()
        with self.assertRaises(NeedsNetns):
            self.sb.link_down()
        with self.assertRaises(NeedsNetns):
            self.sb.link_up()


class LoopbackStartFailure(unittest.TestCase):
    def test_sshd_that_cannot_listen_fails_clearly_and_leaves_nothing(self):
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.2", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        sb = SiteBox(loopback=True)
        sb._free_port = lambda addr: port  # every port it picks is taken
        with self.assertRaises(sitebox.SiteBoxError) as cm:
            sb.up()
        msg = str(cm.exception)
        self.assertIn("sshd exited during start-up", msg)
        self.assertIn("sshd.log", msg)
        self.assertIn("Address already in use", msg)  # the tail of the log says why
        self.assertFalse(os.path.exists(sb.info["state_dir"]))
        self.assertFalse(sb.info["sshd_pid"] and sitebox._pid_alive(sb.info["sshd_pid"]))


class SlurmBox(unittest.TestCase):
    """SiteBox(slurm=True, compute_nodes=2): a real Slurm across the namespaces, its faults, and a
    teardown that leaves no daemon, no job process and no munge socket behind."""

    def test_slurm_two_nodes_outage_and_teardown(self):
        try:
            sb = SiteBox(slurm=True, compute_nodes=2)
            sb.up()
        except sitebox.NeedsSlurm as e:
            sb.close()
            self.skipTest(str(e))
        try:
            sl = sb.slurm
            self.assertEqual(sl["nodes"], [sb.info["hosts"]["compute"]["hostname"],
                                           sb.info["hosts"]["compute2"]["hostname"]])
            p = sb.slurm_run(["sinfo", "-h", "-N", "-o", "%N %T %P"], capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(sorted(set(l.split()[1] for l in p.stdout.splitlines())), ["idle"])
            # A 2-node batch job: each step runs in its own node's namespace (own hostname).
            out = os.path.join(sb.state_dir, "j.out")
            p = sb.slurm_run(["sbatch", "--parsable", "-N2", "-o", out, "--wrap",
                              "srun hostname | sort; sleep 1000"], capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 0, p.stderr)
            jid = p.stdout.strip()
            deadline = time.monotonic() + WAIT
            while len(open(out).read().split()) < 2 if os.path.exists(out) else True:
                self.assertLess(time.monotonic(), deadline, "the 2-node job did not print both hosts")
                time.sleep(0.1)
            self.assertEqual(open(out).read().split(), sorted(sl["nodes"]))
            # compute2 is a node, not a door: hub still reaches neither compute host.
            with self.assertRaises(OSError):
                sb.connect("hub", sb.info["hosts"]["compute2"]["addr"], 22, timeout=1).close()
            # slurmctld down: clients fail (exit 1, as for a missing job), the job runs on; back up, it is there.
            sb.stop_slurmctld()
            p = sb.slurm_run(["squeue", "-h", "-j", jid], capture_output=True, text=True, timeout=60)
            self.assertNotEqual(p.returncode, 0)
            sb.start_slurmctld()
            p = sb.slurm_run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True, timeout=30)
            self.assertEqual(p.stdout.strip(), "RUNNING", p.stderr)
            info = json.loads(json.dumps(sb.info))
        finally:
            sb.close()
        # Nothing left: daemons, the job (it ran in the compute hosts), namespaces, munged's socket dir.
        for pid in [info["slurm"]["slurmctld_pid"], info["slurm"]["munged_pid"]] + list(info["slurm"]["slurmd_pids"].values()):
            self.assertFalse(sitebox._pid_alive(pid), pid)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for h in info["hosts"].values():
            self.assertNotIn(h["ns"], listed)
        self.assertFalse(os.path.exists(info["slurm"]["munge_run_dir"]))
        for pid in os.listdir("/proc"):
            if pid.isdigit() and info["slurm"]["conf"] in sitebox._cmdline(int(pid)):
                self.assertFalse(sitebox._pid_alive(int(pid)), sitebox._cmdline(int(pid)))

    def test_slurm_on_loopback_is_a_skip_not_a_pass(self):
        with self.assertRaises(sitebox.NeedsSlurm):
            SiteBox(loopback=True, slurm=True).up()


def main():
    mode = "all"
    argv = [sys.argv[0]]
    for a in sys.argv[1:]:
        if a in ("--netns", "--loopback", "--slurm"):
            mode = a[2:]
        else:
            argv.append(a)
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    names = argv[1:]
    if names:
        suite.addTests(loader.loadTestsFromNames(names, sys.modules[__name__]))
    else:
        classes = {"netns": [NetnsSite, Faults, Lifecycle], "loopback": [LoopbackSite, LoopbackStartFailure],
                   "slurm": [SlurmBox],
                   "all": [NetnsSite, Faults, Lifecycle, LoopbackSite, LoopbackStartFailure, SlurmBox]}[mode]
        for c in classes:
            suite.addTests(loader.loadTestsFromTestCase(c))
    if os.geteuid() != 0:
        print("skipped: the site in a box needs root (namespaces, sshd)")
        return 77
    res = unittest.TextTestRunner(verbosity=2).run(suite)
    if not res.wasSuccessful():
        return 1
    if res.skipped:
        print("%d test(s) skipped: reporting the run as skipped (exit 77)" % len(res.skipped))
        return 77
    return 0


if __name__ == "__main__":
    sys.exit(main())
