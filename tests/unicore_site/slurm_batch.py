"""The Slurm batch system behind the UNICORE-compatible test site (`unicore_site.py --slurm-conf FILE`),
driven the way UNICORE's TSI drives it (UNICORE-EU/tsi slurm/BSS.py): SlurmBSS builds the batch script
(#SBATCH lines from the job's resources) and submits it with sbatch, learns states from one squeue
listing per poll and `scontrol show job` (end state, exit code, details), aborts with scancel, and maps
Slurm's job states to UNICORE's. Also the Slurm formats the in-process executor renders too (TimeLimit,
hostlists). See README.md ("Slurm mode"). Python 3 stdlib only; not run by itself."""

import os
import re
import subprocess
import threading
import time
import traceback

from unicore_site_base import MSG_ABORTED, HttpError, log, resolve_in


def slurm_time(secs):
    """Slurm's TimeLimit rendering: [D-]HH:MM:SS."""
    secs = int(round(secs))
    d, rest = divmod(secs, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return ("%d-%02d:%02d:%02d" % (d, h, m, s)) if d else ("%02d:%02d:%02d" % (h, m, s))


def expand_hostlist(expr):
    """Expands a Slurm hostlist like 'jrc[0025-0026,0030]' or 'a,b' into host names."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", expr):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append("%s%0*d%s" % (prefix, width, i, suffix))
            else:
                hosts.append(prefix + r + suffix)
    return hosts


# --------------------------------------------------------------------------------------------------
# Slurm: the batch system behind the site (--slurm-conf), driven the way UNICORE's TSI drives it
# --------------------------------------------------------------------------------------------------

# Slurm job states -> UNICORE states while the job is listed by squeue (UNICORE-EU/tsi slurm/BSS.py
# decodes these the same way: PENDING/CONFIGURING -> QUEUED, RUNNING/COMPLETING -> RUNNING). A job that
# squeue no longer lists has ended; its end state comes from `scontrol show job` (SLURM_END_STATES).
SLURM_QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
                       "SUSPENDED", "PREEMPTED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}
SLURM_RUNNING_STATES = {"RUNNING", "COMPLETING"}
SLURM_END_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
SLURM_CMD_TIMEOUT = 20.0  # seconds a client command may take (slurmctld's MessageTimeout is 10 s)
VANISHED_POLLS = 5  # controller answering, job in neither squeue nor scontrol this many times -> FAILED


def parse_scontrol_record(line):
    """One `scontrol show job -o` line -> {key: value}. Values may contain spaces (Command=, Reason=),
    so a new key starts only where ` Name=` follows."""
    out = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|\s*$)", line.strip()):
        out[m.group(1)] = m.group(2)
    return out


def slurm_exit_code(value):
    """scontrol's ExitCode=N:S -> the shell's $? (N, or 128+S for a death by signal S)."""
    m = re.fullmatch(r"(\d+):(\d+)", value or "")
    if not m:
        return None
    code, sig = int(m.group(1)), int(m.group(2))
    return 128 + sig if sig else code


def slurm_minutes(secs):
    """--time in whole minutes, rounded up (Slurm's unit; a 30 s Runtime is a 1-minute limit)."""
    return max(1, int((secs + 59) // 60))


class SlurmBSS:
    """Submits BATCH jobs with sbatch (a batch script with #SBATCH lines for the job's resources, as
    UNICORE's TSI writes it), learns their states with one `squeue` listing per poll (and `scontrol show
    job` for jobs squeue no longer lists: their end state and exit code), aborts with scancel, and
    answers job details with scontrol's own key=value record. A failed query makes the state "unknown":
    the job keeps its last state and nothing is cancelled or failed because of it."""

    def __init__(self, site, args):
        self.site = site
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = os.path.abspath(args.slurm_conf)
        self.poll_interval = args.bss_poll
        self.last_query_ok = None  # time of the last successful squeue
        self.query_failures = 0
        self.thread = threading.Thread(target=self.poll_loop, name="bss-poller", daemon=True)
        self.thread.start()

    def cmd(self, argv, input=None):
        """Runs a Slurm client command; returns (exit code, stdout, stderr); exit None = it hung."""
        try:
            p = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env,
                               timeout=SLURM_CMD_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None, "", "%s timed out after %.0f s" % (argv[0], SLURM_CMD_TIMEOUT)
        except OSError as e:
            return 127, "", str(e)
        return p.returncode, p.stdout, p.stderr.strip()

    # -- submission -------------------------------------------------------------------------------
    def batch_script(self, job):
        d, res = job.desc, job.resources if isinstance(job.resources, dict) else {}
        name = job.name if job.name != "N/A" else "UNICORE_Job"
        if re.search(r"[^0-9a-zA-Z.:=~/_-]", name):
            name = "UNICORE_Job"  # as the TSI does for names Slurm would choke on
        lines = ["#!/bin/bash", "#SBATCH --job-name=%s" % name, "#SBATCH --partition=%s" % job.queue]
        project = res.get("Project", d.get("Project"))
        if project not in (None, ""):
            lines.append("#SBATCH --account=%s" % project)
        if res.get("Nodes") not in (None, ""):
            lines.append("#SBATCH --nodes=%s" % res["Nodes"])
            if res.get("CPUsPerNode") not in (None, ""):
                lines.append("#SBATCH --ntasks-per-node=%s" % res["CPUsPerNode"])
        elif res.get("TotalCPUs") not in (None, ""):
            lines.append("#SBATCH --ntasks=%s" % res["TotalCPUs"])
        elif res.get("CPUsPerNode") not in (None, ""):
            lines.append("#SBATCH --ntasks-per-node=%s" % res["CPUsPerNode"])
        if res.get("NodeConstraints") not in (None, ""):
            lines.append("#SBATCH --constraint=%s" % res["NodeConstraints"])
        if res.get("QoS") not in (None, ""):
            lines.append("#SBATCH --qos=%s" % res["QoS"])
        if res.get("Memory") not in (None, ""):
            lines.append("#SBATCH --mem=%s" % res["Memory"])
        if job.runtime:
            lines.append("#SBATCH --time=%d" % slurm_minutes(job.runtime))
        if res.get("Reservation") not in (None, ""):
            lines.append("#SBATCH --reservation=%s" % res["Reservation"])
        if str(res.get("Exclusive", "false")).lower() == "true":
            lines.append("#SBATCH --exclusive")
        gpus = res.get("GPUsPerNode")
        if gpus not in (None, "", 0, "0"):
            lines.append("#SBATCH --gpus-per-node=%s" % gpus)
        lines.append("#SBATCH --output=%s" % resolve_in(job.dir, str(d.get("Stdout") or "stdout")))
        lines.append("#SBATCH --error=%s" % resolve_in(job.dir, str(d.get("Stderr") or "stderr")))
        if d.get("Stdin"):
            lines.append("#SBATCH --input=%s" % resolve_in(job.dir, str(d["Stdin"])))
        lines.append("#SBATCH --chdir=%s" % job.dir)
        # The user's part: the same environment exports and command line as the in-process executor;
        # SLURM_JOB_ID, SLURM_JOB_NODELIST, ... are Slurm's own here.
        return "\n".join(lines) + "\n" + self.site.build_script(job)

    def submit(self, job):
        site = self.site
        try:
            script = self.batch_script(job)
        except (ValueError, HttpError) as e:
            site.finish(job, "FAILED", "Cannot build the batch script: %s" % (e.message if isinstance(e, HttpError) else e))
            return
        path = os.path.join(job.dir, "UNICORE_Job_%d" % int(time.time() * 1000))
        with open(path, "w") as f:
            f.write(script)
        with site.cv:
            if job.abort_requested or site.shutting_down:
                site.finish(job, "FAILED", MSG_ABORTED)
                return
            delay = job.queue_delay if job.queue_delay is not None else site.queue_delay
        argv = ["sbatch", "--parsable"] + (["--hold"] if delay and delay > 0 else []) + [path]
        t0 = time.time()
        rc, out, err = self.cmd(argv)
        m = re.match(r"(\d+)", out.strip()) if rc == 0 else None
        if m is None:
            # UNICORE's words for a refused submission, with sbatch's own message.
            site.finish(job, "FAILED", "Submission to the batch system failed: %s" % (err or out or "exit %s" % rc).strip())
            return
        with site.cv:
            job.batch_id = m.group(1)
            job.in_slurm = True
            job.held = "--hold" in argv
            job.status = "QUEUED"
            job.bss_state = "PENDING"
            job.queued_at = t0
            job.add_log("Submitted to batch system, ID %s, queue %s (sbatch took %.2f s)" % (
                job.batch_id, job.queue, time.time() - t0))
            site.cv.notify_all()
        log("job %s: Slurm job %s submitted%s" % (job.id, job.batch_id, " held" if job.held else ""))
        if job.abort_requested:
            self.cancel(job)

    # -- control ----------------------------------------------------------------------------------
    def cancel(self, job):
        if not job.in_slurm or job.cancel_sent or not job.batch_id:
            return
        rc, out, err = self.cmd(["scancel", job.batch_id])
        if rc == 0:
            job.cancel_sent = True
            log("job %s: scancel %s" % (job.id, job.batch_id))
        else:
            log("job %s: scancel %s failed (%s): retrying at the next poll" % (job.id, job.batch_id, err))

    def release_due(self, job):
        site = self.site
        with site.lock:
            delay = job.queue_delay if job.queue_delay is not None else site.queue_delay
            due = job.held and job.queued_at is not None and time.time() >= job.queued_at + (delay or 0)
        if due:
            rc, _, err = self.cmd(["scontrol", "release", job.batch_id])
            if rc == 0:
                job.held = False
                job.add_log("Released by the test site (queue delay over)")
            else:
                log("job %s: scontrol release %s failed (%s)" % (job.id, job.batch_id, err))

    def shutdown(self, jobs):
        for j in jobs:
            self.cancel(j)

    # -- status -----------------------------------------------------------------------------------
    def poll_loop(self):
        while True:
            time.sleep(self.poll_interval)
            try:
                self.poll()
            except Exception:
                log("BSS poller: internal error: %s" % traceback.format_exc())

    def poll(self):
        site = self.site
        with site.lock:
            jobs = [j for j in site.jobs.values() if j.in_slurm and j.active]
        if not jobs:
            return
        for j in jobs:
            if j.abort_requested and not j.cancel_sent:
                self.cancel(j)
            elif j.held:
                self.release_due(j)
        rc, out, err = self.cmd(["squeue", "-h", "-a", "-t", "all", "-o", "%i %T %P %r"])
        if rc != 0:
            # squeue's exit 1 is ambiguous (no such job / controller unreachable): without -j it can only
            # mean the controller did not answer. Unknown: keep every state, retry at the next poll.
            self.query_failures += 1
            now = time.time()
            for j in jobs:
                if j.bss_unknown_since is None:
                    j.bss_unknown_since = now
                    j.add_log("Batch system status unknown (squeue failed: %s)" % err)
            if self.query_failures in (1, 10) or self.query_failures % 60 == 0:
                log("BSS poller: squeue failed %d time(s): %s" % (self.query_failures, err))
            return
        if self.query_failures:
            log("BSS poller: squeue answers again after %d failure(s)" % self.query_failures)
        self.query_failures = 0
        self.last_query_ok = time.time()
        listed = {}
        for line in out.splitlines():
            parts = line.split(None, 3)
            if len(parts) >= 2:
                listed[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
        for j in jobs:
            if j.bss_unknown_since is not None:
                j.add_log("Batch system status known again after %.0f s" % (time.time() - j.bss_unknown_since))
                j.bss_unknown_since = None
            state, reason = listed.get(j.batch_id, (None, None))
            if state in SLURM_QUEUED_STATES or state in SLURM_RUNNING_STATES:
                j.vanished_polls = 0
                self.apply_active(j, state)
                continue
            # Not listed (or listed as ended): its end state and exit code come from scontrol.
            self.settle(j)

    def apply_active(self, job, state):
        site = self.site
        with site.cv:
            if not job.active:
                return
            job.bss_state = state
            if state in SLURM_RUNNING_STATES and job.status != "RUNNING":
                job.status = "RUNNING"
                job.started = time.time()
                job.add_log("Running (Slurm job %s)" % job.batch_id)
                site.cv.notify_all()
                log("job %s RUNNING (Slurm job %s, %.2f s after sbatch)" % (job.id, job.batch_id,
                                                                          job.started - job.queued_at))

    def show_job(self, batch_id):
        """(record dict, None) | (None, "gone") | (None, "unknown: <why>")."""
        rc, out, err = self.cmd(["scontrol", "show", "job", "-o", batch_id])
        if rc == 0 and out.strip():
            return parse_scontrol_record(out.splitlines()[0]), None
        if "Invalid job id" in err:
            return None, "gone"
        return None, "unknown: %s" % (err or "exit %s" % rc)

    def settle(self, job):
        site = self.site
        rec, why = self.show_job(job.batch_id)
        if rec is None:
            if why == "gone":
                job.vanished_polls += 1
                if job.vanished_polls >= VANISHED_POLLS:
                    site.finish(job, "FAILED", "Batch job %s is no longer known to the batch system; its end "
                                "state is unknown. More information might be available in the job's working "
                                "directory '%s'" % (job.batch_id, job.dir))
            elif job.bss_unknown_since is None:
                job.bss_unknown_since = time.time()
                job.add_log("Batch system status unknown (%s)" % why)
            return
        job.vanished_polls = 0
        state = rec.get("JobState", "")
        job.time_limit = rec.get("TimeLimit")
        if state in SLURM_RUNNING_STATES or state in SLURM_QUEUED_STATES:
            self.apply_active(job, state)
            return
        if state not in SLURM_END_STATES:
            return  # a state we do not know: wait for the next poll
        if job.started is None and rec.get("StartTime") not in (None, "", "Unknown", "None"):
            job.started = time.time()  # ran between two polls
        code = slurm_exit_code(rec.get("ExitCode"))
        code_s = str(code) if code is not None else None
        where = "More information might be available in the job's working directory '%s'" % job.dir
        if job.abort_requested:
            site.finish(job, "FAILED", MSG_ABORTED, code_s, state)
        elif state == "TIMEOUT":
            site.finish(job, "FAILED", "Batch job %s was terminated by the batch system: state TIMEOUT, CANCELLED "
                        "DUE TO TIME LIMIT (walltime of %s reached). %s" % (job.batch_id, rec.get("TimeLimit"), where),
                        code_s, state)
        elif state == "CANCELLED":
            site.finish(job, "FAILED", "Batch job %s was terminated by the batch system: state CANCELLED (cancelled "
                        "outside UNICORE, e.g. by scancel). %s" % (job.batch_id, where), code_s, state)
        elif state == "COMPLETED" and code == 0 or \
                (state in ("COMPLETED", "FAILED") and str(job.desc.get("IgnoreNonZeroExitCode", "false")).lower() == "true"):
            site.finish(job, "SUCCESSFUL", "", code_s or "0", state)
        elif state in ("COMPLETED", "FAILED"):
            site.finish(job, "FAILED", "User application exited with non-zero exit code: <%s>. %s" % (code_s, where),
                        code_s, state)
        else:
            site.finish(job, "FAILED", "Batch job %s was terminated by the batch system: state %s (%s). %s" % (
                job.batch_id, state, rec.get("Reason", "None"), where), code_s, state)

    # -- details ----------------------------------------------------------------------------------
    def details(self, job):
        """scontrol's record as UNICORE renders details (every key, Slurm's values); when the controller
        does not answer, the last known record with a note."""
        rec, why = self.show_job(job.batch_id)
        if rec is not None:
            job.last_details = rec
            return dict(rec)
        if getattr(job, "last_details", None):
            d = dict(job.last_details)
            d["_note"] = "batch system did not answer (%s); last known details" % why
            return d
        return {"rawDetailsData": "N/A"}
