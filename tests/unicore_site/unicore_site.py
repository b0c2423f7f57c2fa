#!/usr/bin/python3
"""UNICORE-compatible test site: a fixture for kernel-bridge's UNICORE client tests. Never production.

Implements the subset of the UNICORE/X REST API described in shared/reference/unicore-rest.md (core info,
jobs, job details, the job's working-directory storage and its files, security sessions, user preferences)
with the real paths, methods, status codes, headers and JSON shapes. Jobs really run (bash, in a private
0700 directory, optionally inside a network namespace via --job-prefix) and move READY -> QUEUED ->
RUNNING -> SUCCESSFUL/FAILED; Runtime is enforced like a batch system (SIGTERM to the process group,
grace, SIGKILL). A test-only control API under /_control/ injects faults and records requests.

Python 3 stdlib only; run with /usr/bin/python3. See README.md next to this file for the full contract.
The real-Slurm mode (--slurm-conf) is in slurm_batch.py, the small shared helpers (HttpError, resolve_in,
log, messages, parsers) in unicore_site_base.py; both next to this file, which imports them.
"""

import argparse
import base64
import collections
import grp
import itertools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from slurm_batch import SlurmBSS, expand_hostlist, slurm_time
from unicore_site_base import (MSG_ABORTED, MSG_AUTH_FAILED, MSG_SUBMISSION_DISABLED, HttpError, iso_date, log,
                               parse_permissions, parse_runtime, permissions_string, resolve_in)

SESSION_HEADER = "X-UNICORE-SecuritySession"
SESSION_LIFETIME_HEADER = "X-UNICORE-SecuritySession-Lifetime"
PREFS_HEADER = "X-UNICORE-User-Preferences"

ANONYMOUS_DN = "CN=ANONYMOUS,O=UNKNOWN,OU=UNKNOWN"

MAX_REQUEST_BODY = 256 * 1024 * 1024  # uploads are read into memory; a fixture, keep it bounded
MAX_RECORDED_BODY = 1024 * 1024  # bytes of each body kept in /_control/requests
RESOURCE_LIFETIME_S = 86400  # UNICORE's default resource lifetime (services.lifetime.default)

KNOWN_RESOURCES = {"Runtime", "Queue", "Nodes", "CPUsPerNode", "TotalCPUs", "GPUsPerNode", "Memory",
                   "Reservation", "Project", "NodeConstraints", "QoS", "Exclusive"}
# Job description keys that the real server understands but this fixture does not implement: a job using
# them ends FAILED with a statusMessage saying so, instead of silently running something different.
UNSUPPORTED_KEYS = ["User precommand", "User postcommand", "BSS file", "Notification",
                    "NotificationSettings", "Not before", "ApplicationName", "Exports"]


# --------------------------------------------------------------------------------------------------
# Site state
# --------------------------------------------------------------------------------------------------

class User:
    def __init__(self, d):
        if not isinstance(d, dict) or not isinstance(d.get("uid"), str) or not d["uid"]:
            raise ValueError("every user needs a non-empty string 'uid': %r" % (d,))
        self.uid = d["uid"]
        self.password = d.get("password")
        self.tokens = list(d.get("tokens", []))
        self.groups = list(d.get("groups", [self.uid]))
        self.roles = list(d.get("roles", ["user"]))
        self.uids = list(d.get("uids", [self.uid]))
        self.dn = d.get("dn", "CN=%s,O=Test" % self.uid)


class Identity:
    """The authenticated client of one request: user (None = anonymous) and the selected attributes."""

    def __init__(self, user, method=None, prefs=None):
        self.user = user
        self.method = method
        self.prefs = dict(prefs or {})

    @property
    def anonymous(self):
        return self.user is None

    @property
    def uid(self):
        return self.prefs.get("uid") or (self.user.uids[0] if self.user else None)

    @property
    def group(self):
        if "group" in self.prefs:
            return self.prefs["group"]
        return self.user.groups[0] if self.user and self.user.groups else None

    @property
    def role(self):
        if self.user is None:
            return "anonymous"
        return self.prefs.get("role") or (self.user.roles[0] if self.user.roles else "user")

    @property
    def supgids(self):
        return self.prefs.get("supgids", [])


class Session:
    def __init__(self, identity, lifetime_s, token):
        self.id = str(uuid.uuid4())
        self.identity = identity
        self.expires = time.monotonic() + lifetime_s
        self.token = token


class Job:
    def __init__(self, site, identity, desc):
        self.id = str(uuid.uuid4())
        self.site = site
        self.owner = identity.user
        self.uid = identity.uid
        self.group = identity.group
        self.role = identity.role
        self.prefs = {"uid": identity.uid, "group": identity.group, "role": identity.role}
        self.desc = desc
        self.dir = os.path.join(site.state_dir, "jobs", self.id)
        self.status = "READY"
        self.status_message = ""
        self.exit_code = None
        self.queue = "N/A"
        self.batch_id = None
        res = desc.get("Resources") if isinstance(desc.get("Resources"), dict) else {}
        self.job_type = "BATCH"
        self.name = desc.get("Name") if isinstance(desc.get("Name"), str) else "N/A"
        tags = desc.get("Tags", [])
        self.tags = [str(t) for t in tags] if isinstance(tags, list) else [t for t in re.split(r"[ +,]", str(tags)) if t]
        self.submitted = time.time()
        self.queued_at = None
        self.started = None
        self.ended = None
        self.log = []
        self.proc = None
        self.pgid = None
        self.returncode = None
        self.runtime = None
        self.resources = res
        self.client_stage_in = str(desc.get("haveClientStageIn", "false")).lower() == "true"
        self.start_requested = False
        self.abort_requested = False
        self.queue_delay = None  # per-job override from the control API
        self.done = threading.Event()
        self.bss_state = None  # Slurm-like state for details: PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED
        # Slurm mode only: the job is in the real batch system and the BSS poller drives it.
        self.in_slurm = False
        self.held = False  # submitted with --hold (a queue delay); released by the poller
        self.cancel_sent = False  # scancel succeeded (abort); the end state is still Slurm's to tell
        self.bss_unknown_since = None  # the last status query failed: state unknown, nothing changed
        self.vanished_polls = 0  # controller up, job in neither squeue nor scontrol
        self.time_limit = None  # Slurm's TimeLimit, as scontrol prints it
        self.add_log("Created with ID %s" % self.id)

    def add_log(self, msg):
        self.log.append("%s: %s" % (iso_date(time.time()), msg))

    @property
    def active(self):
        return self.status not in ("SUCCESSFUL", "FAILED")


class Site:
    def __init__(self, args, users_doc):
        self.args = args
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.site_name = args.site_name
        self.state_dir = os.path.abspath(args.state_dir)
        os.makedirs(os.path.join(self.state_dir, "jobs"), exist_ok=True)
        os.chmod(os.path.join(self.state_dir, "jobs"), 0o711)
        users = users_doc.get("users")
        if not isinstance(users, list) or not users:
            raise ValueError("users file needs a non-empty list 'users'")
        self.users = [User(u) for u in users]
        self.by_uid = {u.uid: u for u in self.users}
        self.by_token = {}
        self.queues = list(users_doc.get("queues") or [])
        self.jobs = collections.OrderedDict()
        self.sessions = {}
        self.expired_tokens = set()
        self.batch_counter = itertools.count(100001)
        self.up_since = time.time()
        self.recorded = collections.deque(maxlen=2000)
        self.shutting_down = False
        self.base_url = None  # set once listening
        self.slurm = SlurmBSS(self, args) if args.slurm_conf else None
        self.reset_faults()

    def reset_faults(self):
        with self.lock:
            self.fail_next = None
            self.garbage_next = None
            self.latency_ms = 0
            self.submission_enabled = True
            self.queue_delay = self.args.queue_delay
            self.expired_tokens.clear()
            self.by_token = {t: u for u in self.users for t in u.tokens}  # forgets add_token
            self.cv.notify_all()

    # ---- authentication -----------------------------------------------------------------------------

    def authenticate(self, headers):
        """Returns (identity, session or None, token). Raises HttpError 403/432."""
        sid = headers.get(SESSION_HEADER)
        prefs_header = headers.get_all(PREFS_HEADER) or []
        if sid:
            with self.lock:
                s = self.sessions.get(sid)
                if s is None or s.expires < time.monotonic():
                    self.sessions.pop(sid, None)
                    # As the real server: a presented but unknown/expired session is a 432 even when
                    # credentials are present too; the client must drop the session id and retry.
                    raise HttpError(432, "Security session <%s> is expired or unknown." % sid)
            identity = s.identity
            if prefs_header:
                identity = self.apply_prefs(Identity(identity.user, identity.method, identity.prefs), prefs_header)
                s.identity = identity  # the real server keeps preferences in the session's tokens
            return identity, s, s.token
        auth = headers.get("Authorization")
        token = None
        if not auth:
            identity = Identity(None)
        else:
            scheme, _, cred = auth.strip().partition(" ")
            cred = cred.strip()
            user = None
            method = None
            if scheme.lower() == "bearer" and cred:
                token = cred
                if cred in self.expired_tokens:
                    raise HttpError(403, MSG_AUTH_FAILED + " (the bearer token has expired)")
                user = self.by_token.get(cred)
                method = "OAUTH"
            elif scheme.lower() == "basic" and cred:
                try:
                    name, _, pw = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
                except Exception:
                    raise HttpError(403, MSG_AUTH_FAILED + " (malformed Basic credentials)")
                u = self.by_uid.get(name)
                if u is not None and u.password is not None and u.password == pw:
                    user = u
                method = "PASSWORD_FILE"
            else:
                raise HttpError(403, MSG_AUTH_FAILED + " (unsupported Authorization scheme)")
            if user is None:
                raise HttpError(403, MSG_AUTH_FAILED)
            identity = Identity(user, method)
        if prefs_header:
            identity = self.apply_prefs(identity, prefs_header)
        with self.lock:
            s = Session(identity, self.args.session_lifetime_ms / 1000.0, token)
            self.sessions[s.id] = s
            if len(self.sessions) > 10000:  # clients that never reuse sessions must not grow memory forever
                now = time.monotonic()
                for k in [k for k, v in self.sessions.items() if v.expires < now]:
                    del self.sessions[k]
                while len(self.sessions) > 10000:
                    self.sessions.pop(next(iter(self.sessions)))
        return identity, s, token

    def apply_prefs(self, identity, headers):
        prefs = dict(identity.prefs)
        for header in headers:
            for item in header.split(","):
                item = item.strip()
                if not item:
                    continue
                k, sep, v = item.partition(":")
                if not sep or not v:
                    raise HttpError(403, "Invalid format for user preference: %s" % header)
                k = k.strip().lower()
                v = v.strip()
                if k in ("uid", "xlogin"):
                    prefs["uid"] = v
                elif k in ("group", "pgid"):
                    prefs["group"] = v
                elif k == "role":
                    prefs["role"] = v
                elif k == "supgids":
                    prefs["supgids"] = [g for g in v.split("+") if g]
                # other keys (vo, ...) are accepted and ignored, as a site without VOs would
        u = identity.user
        if u is None:
            if prefs:
                raise HttpError(403, "Access denied: anonymous clients cannot select a login, group or role (%s)"
                                % ", ".join("%s:%s" % kv for kv in sorted(prefs.items())))
        else:
            if "uid" in prefs and prefs["uid"] not in u.uids:
                raise HttpError(403, "Access denied: the requested login (uid) '%s' is not available to %s"
                                % (prefs["uid"], u.dn))
            if "group" in prefs and prefs["group"] not in u.groups:
                raise HttpError(403, "Access denied: the requested group '%s' is not available to %s"
                                % (prefs["group"], u.dn))
            if "role" in prefs and prefs["role"] not in u.roles:
                raise HttpError(403, "Access denied: the requested role '%s' is not available to %s"
                                % (prefs["role"], u.dn))
            for g in prefs.get("supgids", []):
                if g not in u.groups:
                    raise HttpError(403, "Access denied: the requested supplementary group '%s' is not "
                                    "available to %s" % (g, u.dn))
        return Identity(u, identity.method, prefs)

    # ---- jobs -----------------------------------------------------------------------------------------

    def submit(self, identity, desc):
        job = Job(self, identity, desc)
        os.makedirs(job.dir, mode=0o700)
        os.chmod(job.dir, 0o700)
        with self.lock:
            self.jobs[job.id] = job
        t = threading.Thread(target=self.supervise, args=(job,), name="job-" + job.id[:8], daemon=True)
        t.start()
        return job

    def finish(self, job, status, message, exit_code=None, bss_state=None):
        with self.lock:
            job.status = status
            job.status_message = message
            if exit_code is not None:
                job.exit_code = exit_code
            job.ended = time.time()
            if bss_state:
                job.bss_state = bss_state
            job.add_log("Status %s%s" % (status, (": " + message) if message else ""))
            self.cv.notify_all()
        job.done.set()
        log("job %s %s %s" % (job.id, status, message))

    def write_imports(self, job):
        imports = job.desc.get("Imports", [])
        if imports in (None, ""):
            return
        if not isinstance(imports, list):
            raise ValueError("Imports must be a list")
        for imp in imports:
            if not isinstance(imp, dict) or not isinstance(imp.get("To"), str) or not imp["To"]:
                raise ValueError("each import needs a 'To' file name: %r" % (imp,))
            fail_on_error = str(imp.get("FailOnError", "true")).lower() != "false"
            try:
                if "Data" not in imp:
                    raise ValueError("import from '%s' is not supported by the test site (only inline "
                                     "'Data' imports are)" % imp.get("From"))
                if imp.get("From") not in (None, "") and not str(imp["From"]).startswith("inline:"):
                    raise ValueError("import from '%s' is not supported by the test site" % imp["From"])
                data = imp["Data"]
                if isinstance(data, list):
                    data = "\n".join(str(x) for x in data)
                elif not isinstance(data, str):
                    raise ValueError("inline Data must be a string or a list of lines")
                path = resolve_in(job.dir, imp["To"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data.encode("utf-8"))
                if imp.get("Permissions") is not None:
                    os.chmod(path, parse_permissions(imp["Permissions"]))
                job.add_log("Imported inline data to %s" % imp["To"])
            except (ValueError, OSError, HttpError) as e:
                msg = e.message if isinstance(e, HttpError) else str(e)
                if fail_on_error:
                    raise ValueError("Stage-in of '%s' failed: %s" % (imp.get("To"), msg))
                job.add_log("Ignoring failed import (FailOnError=false): %s" % msg)

    def validate(self, job):
        """Returns the statusMessage of a job this site cannot run, else None; fills in queue/runtime."""
        d = job.desc
        for k in UNSUPPORTED_KEYS:
            if k in d and d[k] not in (None, "", [], {}):
                return "'%s' is not supported by the test site" % k
        jt = str(d.get("Job type", "BATCH")).upper()
        if jt in ("BATCH", "NORMAL"):
            job.job_type = "BATCH"
        elif jt in ("ON_LOGIN_NODE", "INTERACTIVE"):
            job.job_type = "ON_LOGIN_NODE"
        else:
            return "Job type '%s' is not supported by the test site (BATCH and ON_LOGIN_NODE are)" % d["Job type"]
        if not isinstance(d.get("Executable"), str) or not d["Executable"].strip():
            return "No executable given in the job description"
        args = d.get("Arguments", [])
        if not isinstance(args, list):
            return "Arguments must be a list of strings"
        res = d.get("Resources", {})
        if res in (None, ""):
            res = {}
        if not isinstance(res, dict):
            return "Resources must be a JSON object"
        queue = res.get("Queue")
        if queue is None:
            queue = self.queues[0] if self.queues else "batch"
        queue = str(queue)
        if self.queues and queue not in self.queues:
            return "Partition/Queue <%s> is not available at this site." % queue
        for k in res:
            if k not in KNOWN_RESOURCES:
                return "Resource <%s> is not available for partition <%s>" % (k, queue)
        if job.job_type == "BATCH":
            job.queue = queue
        if "Runtime" in res:
            try:
                job.runtime = parse_runtime(res["Runtime"])
            except ValueError as e:
                return str(e)
        env = d.get("Environment", {})
        if isinstance(env, list):
            for e in env:
                if not isinstance(e, str) or "=" not in e:
                    return "Environment entries must look like 'NAME=value', got %r" % (e,)
        elif not isinstance(env, dict):
            return "Environment must be a map or a list of 'NAME=value'"
        if "Parameters" in d and not isinstance(d["Parameters"], dict):
            return "Parameters must be a map"
        if "Umask" in d and not re.fullmatch(r"[0-7]{1,4}", str(d["Umask"])):
            return "invalid Umask '%s'" % d["Umask"]
        return None

    def build_script(self, job):
        d = job.desc
        lines = []
        if "Umask" in d:
            lines.append("umask %s" % d["Umask"])
        env = collections.OrderedDict()
        env["UC_WORKING_DIRECTORY"] = job.dir + "/"
        env["UC_OUTPUT_DIRECTORY"] = job.dir + "/"
        if job.job_type == "BATCH" and self.slurm is None:  # under real Slurm these are Slurm's own
            env["SLURM_JOB_ID"] = job.batch_id
            env["SLURM_JOB_NODELIST"] = self.args.node_name
            env["SLURM_JOB_NUM_NODES"] = str(len(expand_hostlist(self.args.node_name)))
            env["SLURM_JOB_PARTITION"] = job.queue
        e = d.get("Environment", {})
        if isinstance(e, list):
            for item in e:
                k, _, v = item.partition("=")
                env[k] = v
        else:
            for k, v in e.items():
                env[str(k)] = str(v)
        for k, v in (d.get("Parameters") or {}).items():
            env[str(k)] = str(v)
        for k, v in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError("invalid environment variable name '%s'" % k)
            # Like the real TSI: NAME="value"; export NAME (so $VARS in values expand); quotes escaped.
            v = v.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
            lines.append('%s="%s"; export %s' % (k, v, k))
        # Like the real TSI, the arguments are appended verbatim: they are shell words, the client quotes.
        cmd = d["Executable"] + "".join(" " + str(a) for a in d.get("Arguments", []))
        lines.append(cmd)
        return "\n".join(lines) + "\n"

    def supervise(self, job):
        try:
            self._supervise(job)
        except Exception as e:
            log("job %s: internal error: %s" % (job.id, traceback.format_exc()))
            self.kill_group(job, signal.SIGKILL)
            if job.active:
                self.finish(job, "FAILED", "Test site internal error: %s" % e)

    def _supervise(self, job):
        try:
            self.write_imports(job)
        except ValueError as e:
            self.finish(job, "FAILED", str(e))
            return
        job.add_log("Stage-in done")
        with self.cv:
            if job.client_stage_in:
                job.add_log("Waiting for the client to start the job (haveClientStageIn)")
            while job.client_stage_in and not job.start_requested and not job.abort_requested \
                    and not self.shutting_down:
                self.cv.wait(1.0)
            if job.abort_requested or self.shutting_down:
                self.finish(job, "FAILED", MSG_ABORTED)
                return
        err = self.validate(job)
        if err:
            self.finish(job, "FAILED", err)
            return
        if job.job_type == "BATCH" and self.slurm is not None:
            self.slurm.submit(job)
            return
        with self.cv:
            if job.job_type == "BATCH":
                job.batch_id = str(next(self.batch_counter))
                job.status = "QUEUED"
                job.bss_state = "PENDING"
                job.queued_at = time.time()
                job.add_log("Submitted to batch system, ID %s, queue %s" % (job.batch_id, job.queue))
                while True:
                    if job.abort_requested or self.shutting_down:
                        self.finish(job, "FAILED", MSG_ABORTED, bss_state="CANCELLED")
                        return
                    delay = job.queue_delay if job.queue_delay is not None else self.queue_delay
                    remaining = job.queued_at + delay - time.time()
                    if remaining <= 0:
                        break
                    self.cv.wait(min(remaining, 1.0))
            else:
                job.batch_id = "INTERACTIVE_" + job.id
            script = self.build_script(job)
            argv = ["bash", "-c", script]
            if job.job_type == "BATCH" and self.args.job_prefix:
                argv = shlex.split(self.args.job_prefix) + argv
            stdout_name = str(job.desc.get("Stdout") or "stdout")
            stderr_name = str(job.desc.get("Stderr") or "stderr")
            stdin_name = job.desc.get("Stdin")
            try:
                out = open(resolve_in(job.dir, stdout_name), "ab")
                err_f = open(resolve_in(job.dir, stderr_name), "ab")
                inp = open(resolve_in(job.dir, str(stdin_name)), "rb") if stdin_name else subprocess.DEVNULL
            except (OSError, HttpError) as e:
                self.finish(job, "FAILED", "Cannot set up the job's standard streams: %s"
                            % (e.message if isinstance(e, HttpError) else e))
                return
            try:
                job.proc = subprocess.Popen(argv, cwd=job.dir, stdin=inp, stdout=out, stderr=err_f,
                                            start_new_session=True, close_fds=True)
            except OSError as e:
                self.finish(job, "FAILED", "Could not start the job: %s" % e)
                return
            finally:
                out.close()
                err_f.close()
                if inp is not subprocess.DEVNULL:
                    inp.close()
            job.pgid = job.proc.pid  # start_new_session: the job is its own session and process group
            job.started = time.time()
            job.status = "RUNNING"
            job.bss_state = "RUNNING"
            job.add_log("Running, pid %d" % job.proc.pid)
            self.cv.notify_all()
        log("job %s RUNNING pid %d (%s)" % (job.id, job.proc.pid, job.job_type))
        self.watch(job, stderr_name)

    def watch(self, job, stderr_name):
        grace = self.args.kill_grace
        deadline = job.started + job.runtime if job.runtime else None
        reason = None  # "timeout" | "abort"
        kill_at = None
        while True:
            try:
                job.proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            if reason is None:
                if job.abort_requested or self.shutting_down:
                    reason = "abort"
                elif deadline is not None and now >= deadline:
                    reason = "timeout"
                    self.append_timeout_note(job, stderr_name)
                if reason:
                    log("job %s: %s, SIGTERM to process group %d" % (job.id, reason, job.pgid))
                    self.kill_group(job, signal.SIGTERM)
                    kill_at = now + grace
            elif now >= kill_at:
                log("job %s: grace over, SIGKILL to process group %d" % (job.id, job.pgid))
                self.kill_group(job, signal.SIGKILL)
                kill_at = now + 3600
        job.returncode = job.proc.returncode
        # Like a batch system ending a job step: whatever the main process left behind is terminated.
        if group_alive(job.pgid):
            self.kill_group(job, signal.SIGTERM)
            end = time.time() + grace
            while group_alive(job.pgid) and time.time() < end:
                time.sleep(0.05)
            self.kill_group(job, signal.SIGKILL)
            end = time.time() + 5
            while group_alive(job.pgid) and time.time() < end:
                time.sleep(0.05)
        rc = job.returncode
        code = rc if rc >= 0 else 128 - rc  # a signal death reads like a shell's $? (128+n)
        if reason == "abort":
            self.finish(job, "FAILED", MSG_ABORTED, str(code), "CANCELLED")
        elif reason == "timeout":
            self.finish(job, "FAILED",
                        "Batch job %s was terminated by the batch system: state TIMEOUT, CANCELLED DUE TO "
                        "TIME LIMIT (walltime of %s reached). More information might be available in the "
                        "job's working directory '%s'" % (job.batch_id, slurm_time(job.runtime), job.dir),
                        str(code), "TIMEOUT")
        elif rc == 0 or str(job.desc.get("IgnoreNonZeroExitCode", "false")).lower() == "true":
            self.finish(job, "SUCCESSFUL", "", str(code), "COMPLETED")
        else:
            self.finish(job, "FAILED",
                        "User application exited with non-zero exit code: <%d>. More information might be "
                        "available in the job's working directory '%s'" % (code, job.dir),
                        str(code), "FAILED")

    def append_timeout_note(self, job, stderr_name):
        # What slurmstepd writes into the job's stderr when the time limit is hit.
        try:
            with open(resolve_in(job.dir, stderr_name), "ab") as f:
                f.write(("slurmstepd: error: *** JOB %s ON %s CANCELLED AT %s DUE TO TIME LIMIT ***\n" % (
                    job.batch_id, expand_hostlist(self.args.node_name)[0],
                    time.strftime("%Y-%m-%dT%H:%M:%S"))).encode())
        except (OSError, HttpError):
            pass

    def kill_group(self, job, sig):
        if job.pgid:
            try:
                os.killpg(job.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def abort(self, job):
        with self.cv:
            if job.active:
                job.abort_requested = True
                job.add_log("Abort requested")
                self.cv.notify_all()
        if job.in_slurm and self.slurm is not None:
            self.slurm.cancel(job)  # at once; the poller retries while the controller is down

    def restart(self, job):
        with self.cv:
            if job.active:
                raise HttpError(500, "Error handling action: 'restart': the job is still %s; abort it first"
                                % job.status)
            job.status = "READY"
            job.status_message = ""
            job.exit_code = None
            job.batch_id = None
            job.bss_state = None
            job.start_requested = True
            job.abort_requested = False
            job.proc = None
            job.pgid = None
            job.started = job.ended = None
            job.done = threading.Event()
            job.in_slurm = job.held = job.cancel_sent = False
            job.bss_unknown_since = None
            job.vanished_polls = 0
            job.queued_at = None
            job.add_log("Restarted")
        threading.Thread(target=self.supervise, args=(job,), daemon=True).start()

    def shutdown_jobs(self):
        with self.cv:
            self.shutting_down = True
            jobs = list(self.jobs.values())
            self.cv.notify_all()
        if self.slurm is not None:
            self.slurm.shutdown([j for j in jobs if j.in_slurm and j.active])
        for j in jobs:
            self.kill_group(j, signal.SIGTERM)
        end = time.time() + min(self.args.kill_grace, 2.0)
        while time.time() < end and any(j.pgid and group_alive(j.pgid) for j in jobs):
            time.sleep(0.05)
        for j in jobs:
            self.kill_group(j, signal.SIGKILL)


def group_alive(pgid):
    """True if any non-zombie process is in process group pgid (zombies may linger if init does not reap)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        rest = data[data.rfind(")") + 2:].split()
        if len(rest) > 2 and rest[0] != "Z" and rest[0] != "X" and int(rest[2]) == pgid:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------

class Response:
    def __init__(self, status, body=b"", content_type=None, headers=None, stream=None, length=None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []
        self.stream = stream  # iterable of bytes chunks, with length
        self.length = length


def json_response(status, obj, headers=None):
    return Response(status, json.dumps(obj).encode("utf-8"), "application/json", headers)


def error_response(status, message):
    return json_response(status, {"errorMessage": message, "status": status})


def fields_filter(obj, query):
    spec = query.get("fields", [None])[0]
    if not spec:
        return obj
    want, drop = set(), set()
    for f in re.split(r"[ +,]", spec):
        if not f:
            continue
        (drop if f.startswith("!") else want).add(f.lstrip("!"))
    return {k: v for k, v in obj.items() if k not in drop and (not want or k in want)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 600  # idle keep-alive connections are closed after this many seconds
    site = None  # set by main

    def version_string(self):
        return "UNICORE-test-site"

    # -- plumbing ---------------------------------------------------------------------------------

    def log_message(self, fmt, *args):  # the default logger prints to stderr; ours is one line per request
        pass

    def send_error(self, code, message=None, explain=None):
        # Parse errors from BaseHTTPRequestHandler: keep the JSON error body contract.
        try:
            self.write_response(error_response(code, message or explain or "Bad request"), close=True)
        except OSError:
            pass

    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise HttpError(400, "truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_REQUEST_BODY:
                    raise HttpError(413, "request body larger than %d bytes" % MAX_REQUEST_BODY)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        n = self.headers.get("Content-Length")
        if not n:
            return b""
        try:
            n = int(n)
        except ValueError:
            raise HttpError(400, "bad Content-Length")
        if n > MAX_REQUEST_BODY:
            self.close_connection = True
            raise HttpError(413, "request body larger than %d bytes" % MAX_REQUEST_BODY)
        return self.rfile.read(n)

    def write_response(self, resp, close=False):
        self.send_response(resp.status)
        length = resp.length if resp.stream is not None else len(resp.body)
        if resp.content_type:
            self.send_header("Content-Type", resp.content_type)
        for k, v in resp.headers:
            self.send_header(k, v)
        if resp.status not in (204, 304) and not (100 <= resp.status < 200):
            self.send_header("Content-Length", str(length))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD" or resp.status in (204, 304):
            return
        if resp.stream is not None:
            for chunk in resp.stream:
                self.wfile.write(chunk)
        else:
            self.wfile.write(resp.body)

    def do_GET(self):
        self.handle_any()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def handle_any(self):
        site = self.site
        t0 = time.time()
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        user_desc = "-"
        try:
            body = self.read_body()
        except HttpError as e:
            self.write_response(error_response(e.status, e.message), close=True)
            return
        except (ValueError, OSError) as e:
            self.write_response(error_response(400, "cannot read request body: %s" % e), close=True)
            return
        if path.startswith("/_control/"):
            try:
                resp = self.control(path, query, body)
            except HttpError as e:
                resp = error_response(e.status, e.message)
            except Exception as e:
                log("control error: %s" % traceback.format_exc())
                resp = error_response(500, "control API error: %s" % e)
            self.write_response(resp)
            return
        with site.lock:
            site.recorded.append({
                "method": self.command, "path": path, "query": url.query,
                "headers": {k: v for k, v in self.headers.items()},
                "body_b64": base64.b64encode(body[:MAX_RECORDED_BODY]).decode("ascii"),
                "body_size": len(body), "time": t0})
            latency = site.latency_ms
            fail = self.take_fault("fail_next", path)
            garbage = self.take_fault("garbage_next", path) if fail is None else None
        if latency:
            time.sleep(latency / 1000.0)
        if fail is not None:
            status = int(fail.get("status", 503))
            if fail.get("body") is not None:
                resp = Response(status, str(fail["body"]).encode("utf-8"), fail.get("content_type", "text/plain"))
            else:
                resp = Response(status, json.dumps({"errorMessage": "Injected failure (test site fault "
                                                    "injection)", "status": status}).encode(),
                                fail.get("content_type", "application/json"))
            if status == 503:
                resp.headers.append(("Retry-After", "1"))
            user_desc = "fault"
        elif garbage is not None and garbage.get("kind") in ("drop", "hang"):
            # A connection failure / a server that never answers: no response at all, then the
            # connection is closed (after `seconds` for hang), so clients exercise their timeouts.
            if garbage["kind"] == "hang":
                time.sleep(float(garbage.get("seconds", 30)))
            log("%s %s -> no response (%s injected)" % (self.command, path, garbage["kind"]))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        elif garbage is not None and garbage.get("kind") in ("html", "not_json_200", "huge"):
            resp = self.garbage(garbage, None)
            user_desc = "garbage"
        else:
            session = None
            try:
                identity, session, _ = site.authenticate(self.headers)
                user_desc = identity.uid or "anonymous"
                resp = self.route(path, query, body, identity)
            except HttpError as e:
                resp = error_response(e.status, e.message)
            except Exception as e:
                log("internal error: %s" % traceback.format_exc())
                resp = error_response(500, "Test site internal error: %s" % e)
            if session is not None and resp.status != 432:
                remaining = max(0, int((session.expires - time.monotonic()) * 1000))
                resp.headers.append((SESSION_HEADER, session.id))
                resp.headers.append((SESSION_LIFETIME_HEADER, str(remaining)))
            if garbage is not None:
                resp = self.garbage(garbage, resp)
                user_desc += " garbage"
        try:
            self.write_response(resp)
        finally:
            log("%s %s%s -> %d (%s, %.0f ms)" % (self.command, path, ("?" + url.query) if url.query else "",
                                                 resp.status, user_desc, (time.time() - t0) * 1000))

    def take_fault(self, name, path):
        site = self.site
        f = getattr(site, name)
        if not f or f.get("count", 0) <= 0:
            return None
        if f.get("match") and f["match"] not in path:
            return None
        f["count"] -= 1
        if f["count"] <= 0:
            setattr(site, name, None)
        return dict(f)

    def garbage(self, g, real):
        kind = g.get("kind")
        if kind == "html":
            status = int(g.get("status", 502))
            page = ("<html><head><title>%d Bad Gateway</title></head><body><center><h1>%d Bad Gateway</h1>"
                    "</center><hr><center>nginx</center></body></html>\n" % (status, status)).encode()
            return Response(status, page, "text/html")
        if kind == "not_json_200":
            return Response(200, b"this is not JSON, it is what a confused proxy might send <br>\n",
                            g.get("content_type", "application/json"))
        if kind == "huge":
            size = int(g.get("size", 32 * 1024 * 1024))
            head, tail = b'{"padding": "', b'"}'
            n = max(0, size - len(head) - len(tail))

            def chunks():
                yield head
                left = n
                block = b"x" * (1024 * 1024)
                while left > 0:
                    yield block[:min(left, len(block))]
                    left -= len(block)
                yield tail
            return Response(200, content_type="application/json", stream=chunks(), length=len(head) + n + len(tail))
        if kind == "truncated_json":
            body = real.body if real.body else b'{"errorMessage": "empty", "status": 200}'
            return Response(200, body[:max(1, len(body) // 2)], "application/json", real.headers)
        if kind == "missing_fields":
            try:
                obj = json.loads(real.body) if real.body else {}
            except ValueError:
                obj = {}
            out = {"_links": obj["_links"]} if isinstance(obj, dict) and "_links" in obj else {}
            status = real.status if real.body else 200
            return Response(status, json.dumps(out).encode(), "application/json", real.headers)
        return error_response(500, "unknown garbage kind %r" % kind)

    # -- control API ------------------------------------------------------------------------------

    def control(self, path, query, body):
        site = self.site
        method = self.command
        if path == "/_control/faults" and method == "POST":
            try:
                req = json.loads(body or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as e:
                raise HttpError(400, "faults: bad JSON: %s" % e)
            with site.cv:
                if "fail_next" in req:
                    f = req["fail_next"]
                    site.fail_next = dict(f) if f else None
                    if site.fail_next is not None:
                        site.fail_next.setdefault("count", 1)
                        site.fail_next.setdefault("status", 503)
                if "garbage_next" in req:
                    g = req["garbage_next"]
                    if g and g.get("kind") not in ("html", "truncated_json", "not_json_200", "huge",
                                                   "missing_fields", "drop", "hang"):
                        raise HttpError(400, "garbage_next.kind must be one of html, truncated_json, "
                                        "not_json_200, huge, missing_fields, drop, hang")
                    site.garbage_next = dict(g) if g else None
                    if site.garbage_next is not None:
                        site.garbage_next.setdefault("count", 1)
                if "latency_ms" in req:
                    site.latency_ms = float(req["latency_ms"] or 0)
                if req.get("expire_token"):
                    site.expired_tokens.add(str(req["expire_token"]))
                if req.get("add_token"):
                    at = req["add_token"]
                    u = site.by_uid.get(at.get("uid"))
                    if u is None or not at.get("token"):
                        raise HttpError(400, "add_token needs an existing uid and a token")
                    site.by_token[at["token"]] = u
                    site.expired_tokens.discard(at["token"])
                if req.get("expire_sessions"):
                    site.sessions.clear()
                if "submission_enabled" in req:
                    site.submission_enabled = bool(req["submission_enabled"])
                if "queue_delay" in req:
                    site.queue_delay = float(req["queue_delay"])
                site.cv.notify_all()
                return json_response(200, self.fault_state())
        if path == "/_control/faults" and method == "GET":
            with site.lock:
                return json_response(200, self.fault_state())
        if path == "/_control/reset" and method == "POST":
            site.reset_faults()
            with site.lock:
                site.recorded.clear()
                site.sessions.clear()
            return json_response(200, self.fault_state())
        if path == "/_control/requests" and method == "GET":
            with site.lock:
                out = list(site.recorded)
                if query.get("clear", ["0"])[0] not in ("0", "", "false"):
                    site.recorded.clear()
            return json_response(200, out)
        if path == "/_control/jobs" and method == "GET":
            with site.lock:
                return json_response(200, [self.internal_job(j) for j in site.jobs.values()])
        m = re.fullmatch(r"/_control/jobs/([^/]+)", path)
        if m:
            with site.cv:
                job = site.jobs.get(m.group(1))
                if job is None:
                    raise HttpError(404, "no job %s" % m.group(1))
                if method == "POST":
                    try:
                        req = json.loads(body or b"{}")
                    except ValueError as e:
                        raise HttpError(400, "bad JSON: %s" % e)
                    if "queue_delay" in req:
                        job.queue_delay = None if req["queue_delay"] is None else float(req["queue_delay"])
                    site.cv.notify_all()
                return json_response(200, self.internal_job(job))
        raise HttpError(404, "unknown control path %s %s" % (method, path))

    def fault_state(self):
        s = self.site
        return {"fail_next": s.fail_next, "garbage_next": s.garbage_next, "latency_ms": s.latency_ms,
                "expired_tokens": len(s.expired_tokens), "sessions": len(s.sessions),
                "submission_enabled": s.submission_enabled, "queue_delay": s.queue_delay}

    def internal_job(self, j):
        return {"id": j.id, "owner": j.owner.uid, "uid": j.uid, "group": j.group, "status": j.status,
                "statusMessage": j.status_message, "batchSystemID": j.batch_id,
                "pid": j.proc.pid if j.proc else None, "pgid": j.pgid, "returncode": j.returncode,
                "alive": bool(j.pgid and group_alive(j.pgid)), "dir": j.dir, "queue": j.queue,
                "jobType": j.job_type, "runtime": j.runtime, "resources": j.resources,
                "slurm": j.in_slurm, "bssState": j.bss_state, "held": j.held,
                "bssUnknown": j.bss_unknown_since is not None}

    # -- REST -------------------------------------------------------------------------------------

    def route(self, path, query, body, ident):
        site = self.site
        prefix = "/%s/rest/core" % site.site_name
        if path != prefix and not path.startswith(prefix + "/"):
            raise HttpError(404, "No resource at '%s' (this site's base is %s)" % (path, prefix))
        rest = path[len(prefix):].strip("/")
        parts = [urllib.parse.unquote(p) for p in rest.split("/")] if rest else []
        method = self.command
        if method == "HEAD":
            method = "GET"

        if not parts:
            self.need(method, "GET")
            return json_response(200, fields_filter(self.core_info(ident), query))
        if parts[0] == "jobs":
            if len(parts) == 1:
                if method == "GET":
                    return self.list_jobs(ident, query)
                if method == "POST":
                    return self.submit(ident, body)
                raise HttpError(405, "Method %s not allowed on %s" % (method, path))
            job = self.get_job(ident, parts[1])
            if len(parts) == 2:
                if method == "GET":
                    return json_response(200, fields_filter(self.job_json(job), query))
                if method == "DELETE":
                    return self.delete_job(job)
                if method == "PUT":
                    return self.modify_job(job, body)
                raise HttpError(405, "Method %s not allowed on %s" % (method, path))
            if len(parts) == 3 and parts[2] == "details":
                self.need(method, "GET")
                return json_response(200, fields_filter(self.details(job), query))
            if len(parts) == 3 and parts[2] == "submitted":
                self.need(method, "GET")
                return json_response(200, job.desc)
            if len(parts) == 3 and parts[2] == "forward-port":
                self.need(method, "GET")
                if (self.headers.get("Upgrade") or "").lower() == "unicore-socket-forwarding":
                    raise HttpError(500, "Could not connect to backend service: port forwarding is not "
                                    "implemented by the test site")
                return json_response(200, {"status": "Nothing to see here yet."})
            if len(parts) == 4 and parts[2] == "actions":
                self.need(method, "POST")
                return self.job_action(job, parts[3], body)
            raise HttpError(404, "No resource at '%s'" % path)
        if parts[0] == "storages":
            if len(parts) == 1:
                self.need(method, "GET")
                self.need_user(ident)
                with site.lock:
                    ids = [j.id + "-uspace" for j in site.jobs.values() if j.owner is ident.user]
                return json_response(200, self.paged("storages", ids, query))
            m = re.fullmatch(r"(.+)-uspace", parts[1])
            if not m:
                raise HttpError(404, "No storage '%s' (only job working directories <jobid>-uspace exist)"
                                % parts[1])
            job = self.get_job(ident, m.group(1))
            if len(parts) == 2:
                self.need(method, "GET")
                return json_response(200, fields_filter(self.storage_json(job), query))
            if parts[2] == "files":
                rel = "/".join(parts[3:])
                try:
                    return self.files(job, rel, method, body)
                except OSError as e:
                    # e.g. a path component that is a file, or permissions: the real server's 500 + message
                    raise HttpError(500, "Error accessing '/%s': %s" % (rel, e.strerror or e))
            raise HttpError(404, "No resource at '%s'" % path)
        raise HttpError(404, "No resource at '%s'" % path)

    def need(self, method, allowed):
        if method != allowed:
            raise HttpError(405, "Method %s not allowed here (use %s)" % (method, allowed))

    def need_user(self, ident):
        if ident.anonymous:
            raise HttpError(403, "Access denied: anonymous access is not allowed, please authenticate")

    def get_job(self, ident, jid):
        self.need_user(ident)
        with self.site.lock:
            job = self.site.jobs.get(jid)
        if job is None:
            raise HttpError(404, "Job <%s> not found" % jid)
        if job.owner is not ident.user:
            raise HttpError(403, "Access denied: job <%s> is owned by someone else" % jid)
        return job

    def link(self, rel_path, description=None):
        d = {"href": self.site.base_url + rel_path}
        if description:
            d["description"] = description
        return d

    def paged(self, name, ids, query):
        try:
            offset = int(query.get("offset", ["0"])[0])
            num = int(query.get("num", ["200"])[0])
        except ValueError:
            raise HttpError(400, "offset and num must be integers")
        if offset < 0 or num < 0:
            raise HttpError(400, "offset and num must be positive.")
        base = "%s/%s" % (self.site.base_url, name)
        links = {}
        if offset + num < len(ids):
            links["next"] = {"href": "%s?offset=%d&num=%d" % (base, offset + num, min(num, len(ids) - num))}
        if offset > 0:
            links["previous"] = {"href": "%s?offset=%d&num=%d" % (base, max(offset - num, 0), num)}
        links["self"] = {"href": "%s?offset=%d&num=%d" % (base, offset, num)}
        return {name: ["%s/%s" % (base, i) for i in ids[offset:offset + num]], "_links": links}

    def core_info(self, ident):
        site = self.site
        client = {}
        if ident.anonymous:
            client["dn"] = ANONYMOUS_DN
            client["role"] = {"selected": "anonymous", "availableRoles": []}
        else:
            u = ident.user
            client["dn"] = u.dn
            client["xlogin"] = {"UID": ident.uid, "availableUIDs": u.uids, "group": ident.group,
                                "availableGroups": u.groups, "selectedSupplementaryGroups": ident.supgids}
            client["role"] = {"selected": ident.role, "availableRoles": u.roles}
            if site.queues:
                client["queues"] = {"selected": site.queues[0], "availableQueues": site.queues}
            client["authenticationMethod"] = ident.method
        server = {
            "version": site.args.server_version,
            "siteName": site.site_name,
            "trustedCAs": [],
            "trustedSAMLIssuers": [],
            "externalConnections": {"TSI": "OK"},
            "upSince": iso_date(site.up_since),
            "currentTime": iso_date(time.time()),
            "jobSubmission": {"enabled": site.submission_enabled,
                              "message": "" if site.submission_enabled else MSG_SUBMISSION_DISABLED},
        }
        if site.args.tls_cert:
            server["credential"] = site.credential_info
        return {"client": client, "server": server,
                "_links": {"jobs": self.link("/jobs"), "storages": self.link("/storages")}}

    def list_jobs(self, ident, query):
        self.need_user(ident)
        tags = [t for t in re.split(r"[ +,]", query.get("tags", [""])[0]) if t]
        with self.site.lock:
            ids = [j.id for j in self.site.jobs.values()
                   if j.owner is ident.user and all(t in j.tags for t in tags)]
        return json_response(200, self.paged("jobs", ids, query))

    def submit(self, ident, body):
        site = self.site
        self.need_user(ident)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "Could not submit job: Content-Type must be application/json, got '%s'" % ctype)
        if not site.submission_enabled:
            raise HttpError(503, MSG_SUBMISSION_DISABLED)
        try:
            desc = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(500, "Could not submit job: the job description is not valid JSON: %s" % e)
        if not isinstance(desc, dict):
            raise HttpError(500, "Could not submit job: the job description must be a JSON object")
        job = site.submit(ident, desc)
        log("job %s submitted by %s (uid %s, group %s)" % (job.id, ident.user.uid, job.uid, job.group))
        return Response(201, b"", None, [("Location", "%s/jobs/%s" % (site.base_url, job.id))])

    def job_json(self, job):
        with self.site.lock:
            j = {
                "status": job.status,
                "statusMessage": job.status_message,
                "queue": job.queue,
                "batchSystemID": job.batch_id or "N/A",
                "jobType": job.job_type,
                "name": job.name,
                "owner": job.owner.dn,
                "acl": [],
                "tags": list(job.tags),
                "log": list(job.log),
                "submissionTime": iso_date(job.submitted),
                "terminationTime": iso_date(job.submitted + RESOURCE_LIFETIME_S),
                "submissionPreferences": {"uid": [job.uid], "group": [job.group], "role": [job.role]},
                "consumedTime": self.consumed(job),
                "resourceStatus": "READY",
                "resourceStatusMessage": "N/A",
            }
            if job.exit_code is not None:
                j["exitCode"] = job.exit_code
        base = "/jobs/" + job.id
        j["_links"] = {
            "self": self.link(base),
            "details": self.link(base + "/details", "BSS job details"),
            "submitted": self.link(base + "/submitted", "Submitted job description"),
            "action:start": self.link(base + "/actions/start", "Start"),
            "action:abort": self.link(base + "/actions/abort", "Abort"),
            "action:restart": self.link(base + "/actions/restart", "Restart"),
            "forwarding": self.link(base + "/forward-port", "Start port forwarding"),
            "workingDirectory": self.link("/storages/%s-uspace" % job.id, "Working directory"),
        }
        return j

    def consumed(self, job):
        now = time.time()
        out = {}
        if job.queued_at:
            out["queued"] = str(int((job.started or job.ended or now) - job.queued_at))
        if job.started:
            out["main"] = str(int((job.ended or now) - job.started))
        out["total"] = str(int((job.ended or now) - job.submitted))
        return out

    def details(self, job):
        site = self.site
        with site.lock:
            if job.started is None or job.job_type != "BATCH":
                return {"rawDetailsData": "N/A"}
            in_slurm = job.in_slurm and site.slurm is not None
        if in_slurm:
            return site.slurm.details(job)  # scontrol's own record (outside the lock: it may take seconds)
        with site.lock:
            hosts = expand_hostlist(site.args.node_name)
            res = job.resources
            d = {
                "JobId": job.batch_id,
                "JobName": job.name if job.name != "N/A" else "UNICORE_Job",
                "UserId": "%s(%d)" % (job.uid, os.getuid()),
                "GroupId": "%s(%d)" % (job.group, os.getgid()),
                "Account": str(res.get("Project", job.desc.get("Project", job.group))),
                "QOS": str(res.get("QoS", "normal")),
                "JobState": job.bss_state,
                "Reason": "None",
                "Partition": job.queue,
                "NodeList": site.args.node_name,
                "BatchHost": hosts[0],
                "NumNodes": str(len(hosts)),
                "NumCPUs": str(res.get("TotalCPUs", res.get("CPUsPerNode", 1))),
                "TimeLimit": slurm_time(job.runtime) if job.runtime else "UNLIMITED",
                "SubmitTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job.submitted)),
                "StartTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job.started)),
                "EndTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job.ended)) if job.ended else "Unknown",
                "WorkDir": job.dir,
                "StdOut": os.path.join(job.dir, str(job.desc.get("Stdout") or "stdout")),
                "StdErr": os.path.join(job.dir, str(job.desc.get("Stderr") or "stderr")),
                "ExitCode": "%s:0" % (job.exit_code or "0"),
            }
            if "Reservation" in res:
                d["Reservation"] = str(res["Reservation"])
            if "NodeConstraints" in res:
                d["Features"] = str(res["NodeConstraints"])
            if "Memory" in res:
                d["MinMemoryNode"] = str(res["Memory"])
            if "GPUsPerNode" in res:
                d["TresPerNode"] = "gres/gpu:%s" % res["GPUsPerNode"]
            return d

    def job_action(self, job, action, body):
        if body.strip():
            try:
                json.loads(body)
            except ValueError as e:
                raise HttpError(500, "Error handling action: '%s': bad JSON: %s" % (action, e))
        site = self.site
        if action == "start":
            with site.cv:
                job.start_requested = True
                job.add_log("Start requested by client")
                site.cv.notify_all()
        elif action == "abort":
            site.abort(job)
        elif action == "restart":
            site.restart(job)
        else:
            raise HttpError(404, "Action '%s' not available." % action)
        return Response(204)

    def delete_job(self, job):
        site = self.site
        site.abort(job)
        if not job.done.wait(site.args.kill_grace + 10):
            raise HttpError(500, "Could not destroy job <%s>: its processes did not end" % job.id)
        with site.lock:
            site.jobs.pop(job.id, None)
        shutil.rmtree(job.dir, ignore_errors=True)
        log("job %s deleted" % job.id)
        return Response(204)

    def modify_job(self, job, body):
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("expected a JSON object")
        except ValueError as e:
            raise HttpError(500, "Could not modify properties: bad JSON: %s" % e)
        reply = {}
        with self.site.lock:
            for k, v in req.items():
                if k == "tags" and isinstance(v, (list, str)):
                    job.tags = [str(t) for t in v] if isinstance(v, list) else [t for t in re.split(r"[ +,]", v) if t]
                    reply[k] = "OK"
                else:
                    reply[k] = "Property not found or cannot be modified!"
        return json_response(200, reply)

    def storage_json(self, job):
        sid = job.id + "-uspace"
        try:
            st = os.statvfs(job.dir)
            free, usable = st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize
        except OSError:
            free = usable = 0
        return {
            "resourceStatus": "READY",
            "resourceStatusMessage": "N/A",
            "mountPoint": job.dir + "/",
            "protocols": ["BFT"],
            "umask": "77",
            "freeSpace": free,
            "usableSpace": usable,
            "description": "Job's working directory",
            "uniqueID": sid,
            "owner": job.owner.dn,
            "acl": [],
            "tags": [],
            "terminationTime": iso_date(job.submitted + RESOURCE_LIFETIME_S),
            "metadataSupported": False,
            "_links": {"self": self.link("/storages/" + sid),
                       "files": self.link("/storages/%s/files" % sid, "Files"),
                       "parentJob": self.link("/jobs/" + job.id, "Parent job")},
        }

    def file_props(self, job, path, st):
        isdir = stat.S_ISDIR(st.st_mode)
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return {"isDirectory": isdir, "size": st.st_size, "owner": owner, "group": group,
                "permissions": permissions_string(st.st_mode), "lastAccessed": iso_date(st.st_mtime)}

    def files(self, job, rel, method, body):
        path = resolve_in(job.dir, rel)
        rel_norm = os.path.normpath("/" + rel).rstrip("/") or "/"
        sid = job.id + "-uspace"
        accept = (self.headers.get("Accept") or "").lower()
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if method == "GET":
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                raise HttpError(404, "Error listing '%s': file not found" % rel_norm)
            wants_bytes = "application/octet-stream" in accept and "application/json" not in accept
            if wants_bytes:
                return self.download(path, st, rel_norm)
            props = self.file_props(job, path, st)
            if stat.S_ISDIR(st.st_mode):
                content = {}
                for name in sorted(os.listdir(path)):
                    try:
                        cst = os.lstat(os.path.join(path, name))
                    except OSError:
                        continue
                    cst2 = cst
                    if stat.S_ISLNK(cst.st_mode):
                        try:
                            cst2 = os.stat(os.path.join(path, name))
                        except OSError:
                            pass
                    p = (rel_norm.rstrip("/") + "/" + name)
                    if stat.S_ISDIR(cst2.st_mode):
                        p += "/"
                    content[p] = self.file_props(job, os.path.join(path, name), cst2)
                props["content"] = content
            props["metadata"] = {}
            props["_links"] = {"parentStorage": self.link("/storages/" + sid, "Parent Storage")}
            headers = [] if stat.S_ISDIR(st.st_mode) else [("Accept-Ranges", "bytes")]
            return json_response(200, props, headers)
        if method == "PUT":
            if ctype == "application/json":
                return self.modify_file(path, rel_norm, body)
            if os.path.isdir(path):
                raise HttpError(500, "Error uploading to '%s': it is a directory" % rel_norm)
            parent = os.path.dirname(path)
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise HttpError(500, "Error uploading to '%s': parent is not a directory" % rel_norm)
            os.makedirs(parent, exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
            return Response(204)
        if method == "POST":
            if os.path.exists(path):
                raise HttpError(500, "Cannot create directory <%s>: it exists already" % rel_norm)
            os.makedirs(path)
            return Response(201, b"", None, [("Location", "%s/storages/%s/files%s" % (
                self.site.base_url, sid, rel_norm))])
        if method == "DELETE":
            if os.path.realpath(path) == os.path.realpath(job.dir):
                raise HttpError(500, "Cannot delete </>: the storage root cannot be deleted")
            if not os.path.lexists(path):
                raise HttpError(404, "Cannot delete <%s>: file not found" % rel_norm)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            return Response(204)
        raise HttpError(405, "Method %s not allowed on files" % method)

    def modify_file(self, path, rel_norm, body):
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("expected a JSON object")
        except ValueError as e:
            raise HttpError(500, "bad JSON: %s" % e)
        if not os.path.exists(path):
            raise HttpError(404, "'%s' not found" % rel_norm)
        reply = {}
        perm = req.get("permissions", req.get("unixPermissions"))
        if perm is not None:
            try:
                os.chmod(path, parse_permissions(perm))
                reply["permissions"] = "OK"
            except (ValueError, OSError) as e:
                reply["permissions"] = "FAILED: %s" % e
        if "group" in req:
            reply["group"] = "FAILED: changing the group is not supported by the test site"
        if "metadata" in req:
            reply["metadata"] = "Metadata is not supported for this storage."
        return json_response(200, reply)

    def download(self, path, st, rel_norm):
        if stat.S_ISDIR(st.st_mode):
            return Response(406, json.dumps({"errorMessage": "'%s' is a directory: not acceptable as "
                                             "application/octet-stream" % rel_norm, "status": 406}).encode(),
                            "application/json")
        size = st.st_size
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        status = 200
        if rng is not None:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            bad = m is None or (m.group(1) == "" and m.group(2) == "")
            if not bad:
                if m.group(1) == "":
                    start = max(0, size - int(m.group(2)))
                else:
                    start = int(m.group(1))
                    if m.group(2) != "":
                        end = min(int(m.group(2)), size - 1)
                        bad = int(m.group(2)) < start
                bad = bad or start >= size
            if bad:
                return Response(416, json.dumps({"errorMessage": "Range header '%s' cannot be parsed or "
                                                 "is not satisfiable (file size %d)" % (rng, size),
                                                 "status": 416}).encode(), "application/json",
                                [("Content-Range", "bytes */%d" % size)])
            status = 206
        length = max(0, end - start + 1)

        def chunks():
            with open(path, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    b = f.read(min(left, 1024 * 1024))
                    if not b:
                        break
                    left -= len(b)
                    yield b
                if left > 0:  # the file shrank meanwhile; keep the promised length
                    yield b"\0" * left
        headers = [("Accept-Ranges", "bytes")]
        if status == 206:
            headers.append(("Content-Range", "bytes %d-%d/%d" % (start, end, size)))
        return Response(status, content_type="application/octet-stream", headers=headers, stream=chunks(),
                        length=length)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a bridge with many kernels opens many connections at once
    ssl_context = None

    def finish_request(self, request, client_address):
        # TLS handshake in the connection's own thread, so a stuck client cannot block accept().
        if self.ssl_context is not None:
            try:
                request.settimeout(30)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as e:
                log("TLS handshake with %s failed: %s" % (client_address[0], e))
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            return
        log("connection error from %s: %s" % (client_address[0], traceback.format_exc()))


def discover_node_name(job_prefix):
    """The compute node's host name: `hostname` run through --job-prefix (the compute namespace's UTS)."""
    if job_prefix:
        try:
            r = subprocess.run(shlex.split(job_prefix) + ["hostname"], capture_output=True, text=True,
                               timeout=10)
            name = r.stdout.strip()
            if r.returncode == 0 and name:
                return name
            log("cannot learn the node name through --job-prefix (exit %d: %s); using this host's name"
                % (r.returncode, r.stderr.strip()))
        except (OSError, subprocess.TimeoutExpired) as e:
            log("cannot learn the node name through --job-prefix (%s); using this host's name" % e)
    return socket.gethostname()


def main():
    ap = argparse.ArgumentParser(description="UNICORE-compatible test site (test fixture only)")
    ap.add_argument("--users", required=True, help="users JSON file")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 = pick a free one)")
    ap.add_argument("--port-file", help="write the port number here once listening")
    ap.add_argument("--site-name", default="DEMO-SITE")
    ap.add_argument("--state-dir", help="where job directories live (default: a new temp dir)")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--job-prefix", default="", help="command prepended to BATCH jobs, e.g. nsenter ... --")
    ap.add_argument("--node-name", default=None, help="compute node name (Slurm hostlist allowed); default: `hostname` run through --job-prefix")
    ap.add_argument("--queue-delay", type=float, default=None,
                    help="seconds a job stays QUEUED (default 1.0; with --slurm-conf 0: Slurm queues, a delay "
                         "submits held and releases it)")
    ap.add_argument("--slurm-conf", default=None,
                    help="run BATCH jobs in this real Slurm cluster (sbatch/squeue/scontrol/scancel with "
                         "SLURM_CONF=this file) instead of the in-process executor")
    ap.add_argument("--bss-poll", type=float, default=1.0, help="with --slurm-conf: seconds between squeue polls")
    ap.add_argument("--server-version", default="10.1.0")
    ap.add_argument("--session-lifetime-ms", type=int, default=3600000)
    ap.add_argument("--kill-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    args = ap.parse_args()

    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if args.queue_delay is None:
        args.queue_delay = 0.0 if args.slurm_conf else 1.0
    if args.slurm_conf and not os.path.exists(args.slurm_conf):
        ap.error("--slurm-conf %s does not exist" % args.slurm_conf)
    if not args.node_name:
        args.node_name = discover_node_name(args.job_prefix)
    if not args.state_dir:
        args.state_dir = tempfile.mkdtemp(prefix="unicore_site.")
    try:
        with open(args.users, "rb") as f:
            users_doc = json.load(f)
        site = Site(args, users_doc)
    except (OSError, ValueError) as e:
        sys.stderr.write("unicore_site: cannot load users file %s: %s\n" % (args.users, e))
        return 2

    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port)
    except ValueError:
        ap.error("--listen must be host:port")
    Handler.site = site
    try:
        httpd = Server((host, port), Handler)
    except OSError as e:
        sys.stderr.write("unicore_site: cannot listen on %s: %s\n" % (args.listen, e))
        return 2
    scheme = "http"
    site.credential_info = {}
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            sys.stderr.write("unicore_site: cannot load TLS cert/key: %s\n" % e)
            return 2
        httpd.ssl_context = ctx
        scheme = "https"
        try:
            info = ssl._ssl._test_decode_cert(args.tls_cert)  # fixture only: render server.credential
            flat = lambda seq: ",".join("%s=%s" % kv for rdn in seq for kv in rdn)
            site.credential_info = {"dn": flat(info.get("subject", ())), "issuer": flat(info.get("issuer", ())),
                                    "expires": info.get("notAfter", "")}
        except Exception:
            pass
    real_port = httpd.server_address[1]
    url_host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in url_host:
        url_host = "[%s]" % url_host
    site.base_url = "%s://%s:%d/%s/rest/core" % (scheme, url_host, real_port, args.site_name)

    def on_signal(signum, frame):
        log("signal %d: stopping jobs and exiting" % signum)
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % real_port)
        os.replace(tmp, args.port_file)
    if args.slurm_conf:
        log("listening on %s (state dir %s, BATCH jobs in Slurm: SLURM_CONF=%s)" % (
            site.base_url, site.state_dir, os.path.abspath(args.slurm_conf)))
    else:
        log("listening on %s (state dir %s, node %s, job prefix %r)" % (site.base_url, site.state_dir,
                                                                          args.node_name, args.job_prefix))
    sys.stdout.write("READY %s\n" % site.base_url)
    sys.stdout.flush()
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        site.shutdown_jobs()
        httpd.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
