"""Small pieces shared by the UNICORE-compatible test site (unicore_site.py) and its Slurm batch system
(slurm_batch.py): the real server's messages, HttpError, resolve_in (a path inside a job's storage),
the log line, and the parsers/renderers for dates, Runtime and permissions. unicore_site.py is always
run as a script (__main__), so what both use lives here rather than in it. Python 3 stdlib only; not
run by itself."""

import datetime
import os
import re
import stat
import sys
import time

# The real server's messages (unicorex/use sources), so clients see what they will see in production.
MSG_AUTH_FAILED = "Authentication failed - credentials could not be verified."
MSG_ABORTED = "Job aborted."
MSG_SUBMISSION_DISABLED = "Job submission is disabled at this site (test site: submission_enabled=false)."


def iso_date(ts):
    """yyyy-MM-dd'T'HH:mm:ssZ (Java SimpleDateFormat, e.g. 2024-05-02T10:11:12+0200), local time."""
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")


def log(msg):
    sys.stderr.write("%s unicore_site: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def parse_runtime(value):
    """Runtime in seconds from 3600, "3600", "30min", "2h", "1d", "90s". Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("Runtime must be a number or a string like '30min'")
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|min|h|d)?\s*", str(value))
        if not m:
            raise ValueError("cannot parse Runtime '%s' (use seconds or e.g. 30min, 2h, 1d)" % value)
        secs = float(m.group(1)) * {None: 1, "s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400}[m.group(2)]
    if secs <= 0:
        raise ValueError("Runtime must be positive, got '%s'" % value)
    return secs


def permissions_string(mode):
    out = ""
    for who in ("USR", "GRP", "OTH"):
        for what, ch in (("R", "r"), ("W", "w"), ("X", "x")):
            out += ch if mode & getattr(stat, "S_I%s%s" % (what, who)) else "-"
    return out


def parse_permissions(perm):
    """'rwx------' (9 chars) -> mode bits. Raises ValueError."""
    if not isinstance(perm, str) or not re.fullmatch(r"[r-][w-][xsS-][r-][w-][xsS-][r-][w-][xtT-]", perm):
        raise ValueError("invalid permissions '%s' (expected e.g. 'rwx------')" % perm)
    mode = 0
    for i, ch in enumerate(perm):
        if ch != "-":
            mode |= 1 << (8 - i)
    return mode


class HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message

def resolve_in(root, rel):
    """Absolute path of rel inside root; refuses anything that escapes root (.., symlinks)."""
    norm = os.path.normpath("/" + rel.lstrip("/"))
    path = os.path.join(root, norm.lstrip("/")) if norm != "/" else root
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise HttpError(403, "Access denied: path '%s' is outside the storage" % rel)
    return path
