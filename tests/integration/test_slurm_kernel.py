"""A kernel through the kernelspec wrapper on the UNICORE test site over a REAL Slurm (issue 14,
part 1): the site in a box runs slurmctld on login and slurmd on compute and compute2; the test site
submits the bridge's job with sbatch. Shows:
  1. the kernel is QUEUED (Slurm PENDING, reason Resources) while an operator's job holds both nodes,
     then RUNNING once that job is cancelled; a cell prints the compute host (Slurm's BatchHost);
     `srun hostname` from a cell runs a step in the kernel's own allocation;
  2. slurmctld stopped 30 s while the kernel runs: the kernel stays ready and answers cells, the
     bridge keeps watching after slurmctld is back, nothing is cancelled;
  3. scancel by an operator ends the kernel with end cause "cancelled" and leaves no process;
  4. walltime: Runtime 30 s (Slurm: 1 minute) ends the kernel with end cause "walltime".
Exit 77 (skipped) where Slurm or network namespaces cannot be had.
"""
import os
import re
import subprocess
import sys
import time

import kbtest
from kbfront import (FrontSiteCase, kernel_manager, log, ready_client, shut_down_all, start,
                     stderr_of, wrapper_process)



class SlurmKernel(FrontSiteCase):
    site_args = {"slurm": True, "compute_nodes": 2, "queue_delay": 0.0, "restart_grace": "30s"}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.fs.push_token("root")
        cls.fs.install_kernelspec("kb-slurm", "--display-name", "Site in a box (Slurm)", "--runtime", "30m")
        cls.nodes = cls.fs.box.slurm["nodes"]

    def setUp(self):
        self.fs.push_token("root")

    def tearDown(self):
        shut_down_all(getattr(self, "_kms", []), now=True)
        self.fs.stop_all()
        self.slurm("scancel", "--user=root")  # an operator's job a failed test left behind

    def new_km(self, name):
        km = kernel_manager(name, os.path.join(self.fs.dir, f"wrapper-{name}-{time.time():.0f}.log"))
        self._kms = getattr(self, "_kms", []) + [km]
        return km

    def slurm(self, *argv, timeout=30):
        return self.fs.box.slurm_run(list(argv), capture_output=True, text=True, timeout=timeout)

    def squeue(self, batch_id):
        return self.slurm("squeue", "-h", "-t", "all", "-j", batch_id, "-o", "%T %r").stdout.strip()

    def uc_job(self, job):
        return {j["id"]: j for j in self.fs.unicore_jobs()}[job]

    def test_1_queue_host_outage_scancel(self):
        fs = self.fs
        # An operator's job holds both nodes.
        p = self.slurm("sbatch", "--parsable", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 600")
        self.assertEqual(p.returncode, 0, p.stderr)
        holder = p.stdout.strip()
        deadline = time.time() + 20
        while not self.squeue(holder).startswith("RUNNING"):
            self.assertLess(time.time(), deadline, self.squeue(holder))
            time.sleep(0.2)
        km = self.new_km("kb-slurm")
        t0 = time.time()
        start(km)
        k = fs.wait_kernel(lambda k: k["state"] == "queued" and k["job"]["id"], timeout=90, what="the kernel queued")
        kid, job = k["id"], k["job"]["id"]
        deadline = time.time() + 20
        while self.uc_job(job)["status"] != "QUEUED" or not self.uc_job(job)["batchSystemID"]:
            self.assertLess(time.time(), deadline, self.uc_job(job))
            time.sleep(0.2)
        batch = self.uc_job(job)["batchSystemID"]
        time.sleep(3)
        self.assertEqual(fs.kernel(kid)["state"], "queued")
        state = self.squeue(batch)
        self.assertTrue(state.startswith("PENDING") and "Resources" in state, state)
        self.assertTrue(km.is_alive(), "the wrapper must live while the job queues")
        self.assertIn(f"kernel {kid} queued", stderr_of(km))
        # The operator's job ends: Slurm starts the kernel's job.
        t_free = time.time()
        self.assertEqual(self.slurm("scancel", holder).returncode, 0)
        kc = ready_client(km, timeout=120)
        t_ready = time.time()
        k = fs.kernel(kid)
        states = [h["state"] for h in k["history"]]
        self.assertLess(states.index("queued"), states.index("ready"), states)
        self.assertTrue(self.squeue(batch).startswith("RUNNING"), self.squeue(batch))
        batch_host = [line for line in self.slurm("scontrol", "show", "job", "-o", batch).stdout.split()
                      if line.startswith("BatchHost=")][0].split("=", 1)[1]
        self.assertIn(batch_host, self.nodes)
        self.assertEqual(k["node"], batch_host)
        reply, out, _ = kbtest.run_cell(kc, "import socket; print(socket.gethostname())")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(out.strip(), batch_host)
        reply, out, _ = kbtest.run_cell(
            kc, "import subprocess, os; print(subprocess.run(['srun', 'hostname'], capture_output=True, "
                "text=True, timeout=60).stdout.strip(), os.environ['SLURM_JOB_ID'])", timeout=90)
        self.assertEqual(reply["content"]["status"], "ok", out)
        self.assertEqual(out.split(), [batch_host, batch])  # a step in the kernel's own allocation
        log(f"queued -> ready {t_ready - t_free:.2f} s after the nodes were freed; start -> ready {t_ready - t0:.1f} s")

        # 2. slurmctld down 30 s: the kernel stays, answers, and nothing is cancelled.
        fs.box.stop_slurmctld()
        t_down = time.time()
        try:
            seen = set()
            while time.time() - t_down < 30:
                seen.add(fs.kernel(kid)["state"])
                reply, out, _ = kbtest.run_cell(kc, "print(6 * 7)", timeout=30)
                self.assertEqual(out.strip(), "42")
                time.sleep(2)
        finally:
            fs.box.start_slurmctld()
        log(f"kernel states while slurmctld was down: {sorted(seen)}")
        self.assertEqual(seen, {"ready"})
        self.assertEqual(self.uc_job(job)["status"], "RUNNING")
        deadline = time.time() + 30
        while self.uc_job(job)["bssUnknown"]:
            self.assertLess(time.time(), deadline, "the site never saw Slurm again")
            time.sleep(0.5)
        # The bridge keeps watching: it still polls the job (requests after the outage).
        fs.control("GET", "/requests?clear=1")
        time.sleep(6)
        polls = [r for r in fs.control("GET", "/requests") if job in r["path"] and r["method"] == "GET"]
        self.assertTrue(polls, "the bridge stopped watching the job after the outage")
        self.assertTrue(self.squeue(batch).startswith("RUNNING"))
        self.assertEqual(fs.kernel(kid)["state"], "ready")
        reply, out, _ = kbtest.run_cell(kc, "print('still here')")
        self.assertEqual(out.strip(), "still here")

        # 3. An operator cancels the kernel's job.
        self.assertEqual(self.slurm("scancel", batch).returncode, 0)
        k = fs.wait_kernel(lambda k: k["id"] == kid and k["state"] == "ended", timeout=60, what="the kernel ended")
        self.assertEqual(k["end_cause"], "cancelled", k)
        self.assertIn("cancel", k["reason"].lower())
        proc = wrapper_process(km)
        proc.wait(60)
        self.assertNotEqual(proc.returncode, 0)
        kc.stop_channels()
        fs.wait_nothing_running(timeout=60)

    def test_2_walltime(self):
        fs = self.fs
        fs.install_kernelspec("kb-slurm-short", "--runtime", "30s")
        km = self.new_km("kb-slurm-short")
        t0 = time.time()
        start(km)
        kc = ready_client(km, timeout=120)
        t_ready = time.time()
        kid = fs.live_kernels()[0]["id"]
        job = fs.kernel(kid)["job"]["id"]
        batch = self.uc_job(job)["batchSystemID"]
        # Nothing queued ahead: how long the start took, and Slurm's part of it (sbatch -> RUNNING as
        # the test site saw it, polling every 0.5 s).
        seen = re.findall(r"Slurm job %s, ([0-9.]+) s after sbatch" % batch, fs.tail("unicore-site.log", 200000))
        log(f"start -> ready {t_ready - t0:.2f} s with nothing queued; sbatch -> RUNNING seen after "
            f"{seen[0] if seen else '?'} s")
        self.assertTrue(seen, "the test site did not log the job's start")
        limit = [w for w in self.slurm("scontrol", "show", "job", "-o", batch).stdout.split() if w.startswith("TimeLimit=")]
        self.assertEqual(limit, ["TimeLimit=00:01:00"])  # 30 s rounded up to Slurm's minute
        proc = wrapper_process(km)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            self.fail("the wrapper outlived the walltime:\n" + stderr_of(km))
        kc.stop_channels()
        took = time.time() - t0
        self.assertNotEqual(proc.returncode, 0)
        k = fs.kernel(kid)
        self.assertEqual(k["state"], "ended")
        self.assertEqual(k["end_cause"], "walltime", k)
        self.assertIn("TIMEOUT", k["reason"])
        self.assertTrue(self.squeue(batch).startswith("TIMEOUT"), self.squeue(batch))
        self.assertIn("walltime", stderr_of(km).lower())
        self.assertGreater(took, 55)
        log(f"walltime kernel ended after {took:.0f} s: {k['reason'][:120]}")
        fs.wait_nothing_running(timeout=60)


def main():
    """kbtest.main's rules, and "Slurm cannot run here" (NeedsSlurm) is a skip too."""
    import unittest
    prog = unittest.main(exit=False, verbosity=2)
    result = prog.result
    for _, err in result.errors:
        if "NeedsSlurm" in err or "NeedsNetns" in err:
            print("SKIPPED: " + err.strip().splitlines()[-1], file=sys.stderr)
            sys.exit(kbtest.SKIP)
    if result.wasSuccessful() and result.skipped and result.testsRun <= len(result.skipped):
        sys.exit(kbtest.SKIP)
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
