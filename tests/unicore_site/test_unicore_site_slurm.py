#!/usr/bin/python3
"""The UNICORE test site over a REAL Slurm (unicore_site.py --slurm-conf) in the site in a box.

One site in a box with Slurm (munged, slurmctld on login, slurmd on compute and compute2) for the
whole file; the UNICORE test site runs in login and submits with sbatch. Shows, against Slurm's
own answers (squeue, scontrol, the job's files):
  1. a job queues (QUEUED, Slurm PENDING) while another job holds both nodes, then runs; the
     holder, aborted through UNICORE, ends "Job aborted." and Slurm CANCELLED;
  2. a 2-node job: details show both nodes (Slurm's NodeList), srun in it reaches both hosts;
  3. scancel by an operator (not through UNICORE) ends the job FAILED with the cancelled words;
  4. slurmctld stopped 30 s while a job runs: the job keeps running (its heartbeat goes on), the
     site reports RUNNING throughout (state "unknown" underneath), reports again after slurmctld is
     back, and nothing is cancelled: the job ends SUCCESSFUL;
  5. walltime: Runtime 30s (Slurm rounds up to 1 minute) ends TIMEOUT -> FAILED with the site's
     words, slurmstepd's line in stderr, and no process left on the node.
The walltime job is submitted first and waited for last, so its ~80 s overlap the other tests.

Exit 77 (ctest: skipped) where Slurm or network namespaces cannot be had; never a pass then.
KB_REQUIRE_SLURM=1 makes "Slurm cannot start" a failure instead.
"""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(SRC, "tests", "sitebox"))
from sitebox import NeedsNetns, NeedsSlurm, SiteBox  # noqa: E402

SITE_SCRIPT = os.path.join(HERE, "unicore_site.py")
PYTHON = "/usr/bin/python3"
PORT = 8080  # inside login's network namespace
AUTH = {"Authorization": "Bearer tok-root"}
USERS = {"users": [{"uid": "root", "tokens": ["tok-root"], "groups": ["users", "proj1"]}],
         "queues": ["batch", "gpus"]}
BASE = "/DEMO-SITE/rest/core"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class SlurmSite(unittest.TestCase):
    sb = None
    site = None
    walltime_job = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kb-ucslurm-")
        cls.sb = SiteBox(state_dir=os.path.join(cls.tmp, "box"), slurm=True, compute_nodes=2)
        try:
            cls.sb.up()
        except BaseException:
            cls.sb.close()
            raise
        users = os.path.join(cls.tmp, "users.json")
        with open(users, "w") as f:
            json.dump(USERS, f)
        cls.site_log = open(os.path.join(cls.tmp, "site.log"), "ab")
        cls.site = cls.sb.popen("login", [PYTHON, SITE_SCRIPT, "--users", users, "--listen", "127.0.0.1:%d" % PORT,
                                          "--state-dir", os.path.join(cls.tmp, "state"),
                                          "--slurm-conf", cls.sb.slurm["conf"], "--bss-poll", "0.5"],
                                stdout=subprocess.PIPE, stderr=cls.site_log, text=True, start_new_session=True)
        line = cls.site.stdout.readline().strip()
        if not line.startswith("READY "):
            cls.tearDownClass()
            raise RuntimeError("the UNICORE test site did not start: %r" % line)
        cls.nodes = cls.sb.slurm["nodes"]
        # Submitted now, checked last (test_9): the ~80 s of a walltime overlap the other tests.
        cls.walltime_job = cls.submit_job({"Executable": "echo $$ > job.pid; exec sleep 600",
                                           "Resources": {"Runtime": "30s"}})

    @classmethod
    def tearDownClass(cls):
        if cls.site is not None and cls.site.poll() is None:
            cls.site.send_signal(signal.SIGTERM)
            try:
                cls.site.wait(15)
            except subprocess.TimeoutExpired:
                cls.site.kill()
                cls.site.wait()
        if cls.site is not None:
            cls.site.stdout.close()
            cls.site_log.close()
        if cls.sb is not None:
            cls.sb.close()
        if not os.environ.get("KB_SITEBOX_KEEP"):
            shutil.rmtree(cls.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------
    @classmethod
    def http(cls, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        conn.sock = cls.sb.connect("login", "127.0.0.1", PORT, timeout=60)
        try:
            hdrs = dict(AUTH, Accept="application/json")
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            raw = r.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            return r.status, dict(r.getheaders()), body
        finally:
            conn.close()

    @classmethod
    def submit_job(cls, desc):
        st, hdrs, _ = cls.http("POST", BASE + "/jobs", desc)
        assert st == 201, st
        return hdrs["Location"].split("/jobs/", 1)[1]

    def job(self, jid):
        st, _, j = self.http("GET", BASE + "/jobs/" + jid)
        self.assertEqual(st, 200)
        return j

    def details(self, jid):
        st, _, d = self.http("GET", BASE + "/jobs/%s/details" % jid)
        self.assertEqual(st, 200)
        return d

    def control_job(self, jid):
        st, _, j = self.http("GET", "/_control/jobs/" + jid)
        self.assertEqual(st, 200)
        return j

    def wait_status(self, jid, want, timeout, every=0.2):
        deadline = time.time() + timeout
        while True:
            j = self.job(jid)
            if j["status"] in want:
                return j
            if time.time() > deadline:
                self.fail("job %s still %s after %.0f s (want %s): %s" % (jid, j["status"], timeout, want, j["log"]))
            time.sleep(every)

    def slurm(self, *argv):
        return self.sb.slurm_run(list(argv), capture_output=True, text=True, timeout=30)

    def squeue_state(self, batch_id):
        p = self.slurm("squeue", "-h", "-t", "all", "-j", batch_id, "-o", "%T %r")
        return p.stdout.strip()

    def job_dir(self, jid):
        return self.control_job(jid)["dir"]

    def read(self, jid, name):  # the job's files (the state dir is on this machine's file system)
        try:
            with open(os.path.join(self.job_dir(jid), name)) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- 1. queueing --------------------------------------------------------------------------------
    def test_1_queued_while_the_nodes_are_held_then_runs(self):
        self.wait_status(self.walltime_job, ("RUNNING",), 30)  # it holds one CPU of one node
        # The holder takes one CPU on each node (2 CPUs per node, the walltime job has one of them).
        holder = self.submit_job({"Executable": "sleep 300", "Resources": {"Nodes": "2", "CPUsPerNode": "1"}})
        self.wait_status(holder, ("RUNNING",), 30)
        # Now each node has at most one free CPU (2 CPUs each; walltime job 1, holder 1 per node): a job
        # asking for 2 CPUs on one node must queue, and Slurm says why.
        waiter = self.submit_job({"Executable": "hostname", "Resources": {"Nodes": "1", "CPUsPerNode": "2"}})
        t_sub = time.time()
        j = self.wait_status(waiter, ("QUEUED",), 10)
        self.assertNotEqual(j["batchSystemID"], "N/A")
        time.sleep(3)  # several polls: it stays queued, in Slurm and in UNICORE
        j = self.job(waiter)
        self.assertEqual(j["status"], "QUEUED", j["log"])
        state = self.squeue_state(j["batchSystemID"])
        self.assertTrue(state.startswith("PENDING"), state)
        self.assertIn("Resources", state)  # Slurm's pending reason, not a timer
        self.assertEqual(self.details(waiter), {"rawDetailsData": "N/A"})  # as before: N/A until it runs
        # Abort the holder through UNICORE: scancel; it ends "Job aborted." and Slurm says CANCELLED.
        st, _, _ = self.http("POST", BASE + "/jobs/%s/actions/abort" % holder, {})
        self.assertEqual(st, 204)
        h = self.wait_status(holder, ("FAILED", "SUCCESSFUL"), 30)
        self.assertEqual(h["status"], "FAILED")
        self.assertEqual(h["statusMessage"], "Job aborted.")
        self.assertEqual(self.details(holder)["JobState"], "CANCELLED")
        # The waiter runs now, on one node, and succeeds.
        w = self.wait_status(waiter, ("SUCCESSFUL", "FAILED"), 30)
        self.assertEqual(w["status"], "SUCCESSFUL", w["statusMessage"])
        self.assertIn(self.read(waiter, "stdout").strip(), self.nodes)
        log("queued job ran %.1f s after its submission, once the holder was aborted" % (time.time() - t_sub))

    # -- 2. two nodes ---------------------------------------------------------------------------------
    def test_2_two_node_job_shows_both_nodes(self):
        t0 = time.time()
        jid = self.submit_job({"Executable": "srun hostname | sort > hosts; echo nodes=$SLURM_JOB_NUM_NODES; sleep 3",
                               "Resources": {"Nodes": "2", "CPUsPerNode": "1", "Runtime": "10min",
                                             "Project": "proj1", "Queue": "gpus"}})
        j = self.wait_status(jid, ("RUNNING", "SUCCESSFUL", "FAILED"), 30, every=0.05)
        self.assertEqual(j["status"], "RUNNING", j["statusMessage"])
        running_after = time.time() - t0
        d = self.details(jid)
        self.assertEqual(d["JobId"], j["batchSystemID"])
        self.assertEqual(d["JobState"], "RUNNING")
        self.assertEqual(d["NumNodes"], "2")
        self.assertEqual(sorted(d["NodeList"].split(",")), sorted(self.nodes))  # Slurm's own NodeList
        self.assertIn(d["BatchHost"], self.nodes)
        self.assertEqual(d["Partition"], "gpus")
        self.assertEqual(d["Account"], "proj1")
        self.assertEqual(d["TimeLimit"], "00:10:00")
        self.assertEqual(d["WorkDir"], self.job_dir(jid))
        j = self.wait_status(jid, ("SUCCESSFUL", "FAILED"), 30)
        self.assertEqual(j["status"], "SUCCESSFUL", j["statusMessage"])
        self.assertEqual(j["exitCode"], "0")
        self.assertEqual(self.read(jid, "hosts").split(), sorted(self.nodes))  # a step on each host
        self.assertIn("nodes=2", self.read(jid, "stdout"))
        log("2-node job: submit -> RUNNING seen after %.2f s (poll 0.5 s)" % running_after)

    # -- 3. operator's scancel -------------------------------------------------------------------------
    def test_3_scancel_by_an_operator(self):
        jid = self.submit_job({"Executable": "sleep 300"})
        j = self.wait_status(jid, ("RUNNING",), 30)
        p = self.slurm("scancel", j["batchSystemID"])
        self.assertEqual(p.returncode, 0, p.stderr)
        j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"), 30)
        self.assertEqual(j["status"], "FAILED")
        msg = j["statusMessage"]
        self.assertIn("Batch job %s was terminated by the batch system: state CANCELLED" % j["batchSystemID"], msg)
        self.assertIn("cancel", msg.lower())  # what the bridge reads as "cancelled outside the bridge"
        self.assertNotIn("abort", msg.lower())  # not UNICORE's own abort
        self.assertEqual(self.details(jid)["JobState"], "CANCELLED")
        self.assertIn("CANCELLED", self.read(jid, "stderr"))  # slurmstepd's line

    # -- 4. slurmctld outage ------------------------------------------------------------------------------
    def test_4_slurmctld_down_30s_nothing_is_cancelled(self):
        jid = self.submit_job({"Executable": "for i in $(seq 50); do date +%s >> beats; sleep 1; done; echo done",
                               "Resources": {"Runtime": "10min"}})
        j = self.wait_status(jid, ("RUNNING",), 30)
        batch = j["batchSystemID"]
        time.sleep(1)
        self.sb.stop_slurmctld()
        t_down = time.time()
        self.assertNotEqual(self.slurm("squeue").returncode, 0)  # the controller is really gone
        seen_unknown = False
        while time.time() - t_down < 30:
            j = self.job(jid)
            self.assertEqual(j["status"], "RUNNING", "a failed status query must not change the job: %s" % j["log"])
            seen_unknown = seen_unknown or self.control_job(jid)["bssUnknown"]
            time.sleep(1)
        beats = [int(b) for b in self.read(jid, "beats").split()]
        t_up = time.time()
        self.sb.start_slurmctld()
        beats_during = len([b for b in beats if int(t_down) < b <= int(t_up)])  # the job's own clock
        log("slurmctld was down %.1f s; the job wrote %d heartbeats meanwhile" % (t_up - t_down, beats_during))
        self.assertTrue(seen_unknown, "the site never noticed the controller was gone")
        # The job kept running all through the outage: it beat at its start and at its end.
        self.assertGreaterEqual(beats_during, 15, "the job did not keep running while slurmctld was down")
        self.assertGreaterEqual(max(beats), int(t_up) - 4, "no heartbeat at the end of the outage")
        # Reported again: the unknown state clears and Slurm still has the job RUNNING.
        deadline = time.time() + 30
        while self.control_job(jid)["bssUnknown"] and time.time() < deadline:
            time.sleep(0.5)
        self.assertFalse(self.control_job(jid)["bssUnknown"], "status not reported again after slurmctld came back")
        self.assertTrue(any("known again" in line for line in self.job(jid)["log"]))
        self.assertTrue(self.squeue_state(batch).startswith("RUNNING"), self.squeue_state(batch))
        self.assertEqual(self.job(jid)["status"], "RUNNING")
        j = self.wait_status(jid, ("SUCCESSFUL", "FAILED"), 60)
        self.assertEqual(j["status"], "SUCCESSFUL", j["statusMessage"])
        self.assertIn("done", self.read(jid, "stdout"))
        self.assertEqual(self.details(jid)["JobState"], "COMPLETED")
        with open(os.path.join(self.tmp, "site.log")) as f:
            self.assertNotIn("scancel %s" % batch, f.read())  # nothing cancelled

    # -- 9. walltime (submitted in setUpClass) ---------------------------------------------------------
    def test_9_walltime_ends_timeout(self):
        jid = self.walltime_job
        j = self.wait_status(jid, ("RUNNING", "FAILED", "SUCCESSFUL"), 30)
        pid_text = ""
        deadline = time.time() + 10
        while not pid_text and time.time() < deadline:
            pid_text = self.read(jid, "job.pid").strip()
            time.sleep(0.2)
        self.assertTrue(pid_text.isdigit(), "the job did not start: %r" % pid_text)
        j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"), 150, every=1)
        ctl = self.control_job(jid)
        self.assertEqual(j["status"], "FAILED")
        self.assertEqual(ctl["bssState"], "TIMEOUT")
        self.assertRegex(j["statusMessage"], r"^Batch job %s was terminated by the batch system: state TIMEOUT, "
                         r"CANCELLED DUE TO TIME LIMIT \(walltime of 00:01:00 reached\)\." % j["batchSystemID"])
        d = self.details(jid)
        self.assertEqual(d["JobState"], "TIMEOUT")
        self.assertEqual(d["TimeLimit"], "00:01:00")  # Runtime 30s, rounded up to Slurm's minute
        self.assertRegex(self.read(jid, "stderr"), r"slurmstepd(-\S+)?: error: \*\*\* JOB %s ON \S+ CANCELLED AT \S+ DUE TO "
                         r"TIME LIMIT \*\*\*" % j["batchSystemID"])
        self.assertGreaterEqual(int(j["consumedTime"].get("main", "0")), 55)
        # No process left: the job's shell (exec'd into sleep) is gone from the node.
        deadline = time.time() + 15
        while os.path.exists("/proc/%s" % pid_text) and time.time() < deadline:
            time.sleep(0.2)
        alive = ""
        if os.path.exists("/proc/%s/cmdline" % pid_text):
            with open("/proc/%s/cmdline" % pid_text, "rb") as f:
                alive = f.read().replace(b"\0", b" ").decode()
        self.assertNotIn("sleep 600", alive, "the job's process survived its walltime")
        log("walltime job: %s (consumed %s s)" % (j["statusMessage"][:80], j["consumedTime"]))


def main():
    if os.geteuid() != 0:
        print("SKIPPED: the site in a box with Slurm needs root", file=sys.stderr)
        return 77
    try:
        prog = unittest.main(exit=False, verbosity=2)
    except (NeedsSlurm, NeedsNetns) as e:
        print("SKIPPED: %s" % e, file=sys.stderr)
        return 77
    res = prog.result
    for _, err in res.errors:
        if "NeedsSlurm" in err or "NeedsNetns" in err:
            print("SKIPPED: Slurm cannot run here:\n%s" % err.strip().splitlines()[-1], file=sys.stderr)
            return 77
    if not res.wasSuccessful():
        return 1
    if res.skipped:
        return 77
    return 0


if __name__ == "__main__":
    sys.exit(main())
