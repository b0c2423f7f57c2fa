"""Shared pieces of the site in a box: its exceptions (SiteBoxError, NeedsNetns) and the small
process and namespace helpers (run a setup command, /proc lookups, kill and wait, setns) that
sitebox.py and its Slurm part (slurm.py) both use. sitebox.py re-exports what its users know from it
(`sitebox.SiteBoxError`, `sitebox.NeedsNetns`, `sitebox.descendants`, `sitebox._pid_alive`, ...).
Stdlib only; not run by itself."""

import ctypes
import os
import signal
import socket as _socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000


class NeedsNetns(Exception):
    """Raised when a test or fault needs isolated hosts but the site runs on loopback.

    Tests turn it into a skip (exit code 77), never into a pass."""



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



def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
