#!/usr/bin/python3
"""Proves the UNICORE-compatible test site against shared/reference/unicore-rest.md.

Starts tests/unicore_site/unicore_site.py on loopback and talks to it with http.client, asserting the
paths, status codes, headers, JSON shapes and job behaviour (processes really run, are really killed).
Job states are driven deterministically: jobs are held QUEUED through the control API and held RUNNING
until the test uploads a 'go' file, so no assertion depends on timing.
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SITE_SCRIPT = os.path.join(HERE, "unicore_site.py")
PYTHON = os.environ.get("KB_PYTHON", "/usr/bin/python3")
DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}$")
NODE = "cn[0007-0008]"

USERS = {
    "users": [
        {"uid": "alice", "password": "alice-pw", "tokens": ["tok-alice", "tok-alice-2"],
         "groups": ["users", "proj1"], "roles": ["user"], "dn": "CN=alice,O=Test"},
        {"uid": "bob", "password": "bob-pw", "tokens": ["tok-bob"], "groups": ["users"],
         "roles": ["user"], "dn": "CN=bob,O=Test"},
    ],
    "queues": ["batch", "gpus"],
}
ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Basic " + base64.b64encode(b"bob:bob-pw").decode()}


def start_site(tmp, extra=()):
    users = os.path.join(tmp, "users.json")
    with open(users, "w") as f:
        json.dump(USERS, f)
    port_file = os.path.join(tmp, "port")
    with open(os.path.join(tmp, "site.log"), "ab") as log_file:
        proc = subprocess.Popen([PYTHON, SITE_SCRIPT, "--users", users, "--listen", "127.0.0.1:0",
                                 "--port-file", port_file, "--state-dir", os.path.join(tmp, "state"),
                                 "--queue-delay", "0.2", "--kill-grace", "1", "--node-name", NODE,
                                 "--session-lifetime-ms", "600000"] + list(extra),
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        with open(os.path.join(tmp, "site.log")) as f:
            raise RuntimeError("test site did not start: %r\n%s" % (line, f.read()))
    with open(port_file) as f:
        port = int(f.read())
    return proc, line.split(" ", 1)[1], port


def stop_site(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Resp:
    def __init__(self, r, body):
        self.status = r.status
        self.headers = r.headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class SiteTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="usite_test.")
        try:
            cls.proc, cls.base, cls.port = start_site(cls.tmp, ["--job-prefix", "env SITE_PREFIX=batch"])
        except Exception:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise
        cls.base_path = urllib.parse.urlsplit(cls.base).path

    @classmethod
    def tearDownClass(cls):
        stop_site(cls.proc)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.control("POST", "/_control/reset", {})

    # -- helpers ----------------------------------------------------------------------------------

    def request(self, method, path, headers=None, body=None, port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        try:
            if path.startswith("http"):
                path = urllib.parse.urlsplit(path).path + (
                    "?" + urllib.parse.urlsplit(path).query if urllib.parse.urlsplit(path).query else "")
            elif not path.startswith("/_control"):
                path = self.base_path + path
            h = {"Accept": "application/json"}
            h.update(headers or {})
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                h.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Resp(r, r.read())
        finally:
            conn.close()

    def control(self, method, path, body=None):
        r = self.request(method, path, body=body)
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def assert_error(self, r, status):
        self.assertEqual(r.status, status, r.body)
        self.assertEqual(r.headers["Content-Type"], "application/json")
        e = r.json()
        self.assertEqual(e["status"], status)
        self.assertIsInstance(e["errorMessage"], str)
        self.assertTrue(e["errorMessage"])
        return e

    def submit(self, desc, headers=ALICE, hold=False):
        if hold:  # no window in which the job could leave QUEUED before it has its own delay
            self.control("POST", "/_control/faults", {"queue_delay": 3600})
        r = self.request("POST", "/jobs", headers, desc)
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(r.body, b"")
        loc = r.headers["Location"]
        self.assertTrue(loc.startswith(self.base + "/jobs/"), loc)
        jid = loc.rsplit("/", 1)[1]
        if hold:
            self.control("POST", "/_control/jobs/" + jid, {"queue_delay": 3600})
            self.control("POST", "/_control/faults", {"queue_delay": 0.2})
        return jid

    def job(self, jid, headers=ALICE, fields=None):
        r = self.request("GET", "/jobs/%s%s" % (jid, "?fields=" + fields if fields else ""), headers)
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def wait_status(self, jid, wanted, timeout=20):
        end = time.time() + timeout
        while True:
            j = self.job(jid)
            if j["status"] in wanted:
                return j
            if time.time() > end:
                self.fail("job %s still %s (%s), wanted %s" % (jid, j["status"], j["statusMessage"], wanted))
            time.sleep(0.05)

    def internal(self, jid):
        return self.control("GET", "/_control/jobs/" + jid)

    def files_url(self, jid, rel=""):
        return "/storages/%s-uspace/files/%s" % (jid, rel)

    def upload(self, jid, rel, data, headers=ALICE):
        h = dict(headers)
        h["Content-Type"] = "application/octet-stream"
        r = self.request("PUT", self.files_url(jid, rel), h, data)
        self.assertEqual(r.status, 204, r.body)

    def download(self, jid, rel, extra=None, headers=ALICE):
        h = dict(headers)
        h["Accept"] = "application/octet-stream"
        h.update(extra or {})
        return self.request("GET", self.files_url(jid, rel), h)

    def wait_file(self, jid, rel, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            r = self.download(jid, rel)
            if r.status == 200 and r.body.strip():
                return r.body
            time.sleep(0.05)
        self.fail("file %s never appeared in job %s" % (rel, jid))

    # -- core -------------------------------------------------------------------------------------

    def test_core_info_authenticated(self):
        r = self.request("GET", "", ALICE)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["Content-Type"], "application/json")
        self.assertTrue(r.headers[("X-UNICORE-SecuritySession")])
        self.assertTrue(0 < int(r.headers["X-UNICORE-SecuritySession-Lifetime"]) <= 600000)
        c = r.json()
        self.assertEqual(c["client"]["dn"], "CN=alice,O=Test")
        self.assertEqual(c["client"]["xlogin"], {"UID": "alice", "availableUIDs": ["alice"], "group": "users",
                                                 "availableGroups": ["users", "proj1"],
                                                 "selectedSupplementaryGroups": []})
        self.assertEqual(c["client"]["role"], {"selected": "user", "availableRoles": ["user"]})
        self.assertEqual(c["client"]["queues"], {"selected": "batch", "availableQueues": ["batch", "gpus"]})
        self.assertEqual(c["server"]["version"], "10.1.0")
        self.assertEqual(c["server"]["siteName"], "DEMO-SITE")
        self.assertEqual(c["server"]["jobSubmission"]["enabled"], True)
        self.assertRegex(c["server"]["upSince"], DATE_RE)
        self.assertRegex(c["server"]["currentTime"], DATE_RE)
        self.assertEqual(c["_links"]["jobs"]["href"], self.base + "/jobs")
        self.assertEqual(c["_links"]["storages"]["href"], self.base + "/storages")
        # Basic works the same way; fields= limits the output
        r = self.request("GET", "?fields=client", {"Authorization": "Basic " +
                                                   base64.b64encode(b"alice:alice-pw").decode()})
        self.assertEqual(list(r.json().keys()), ["client"])
        self.assertEqual(r.json()["client"]["xlogin"]["UID"], "alice")

    def test_core_info_anonymous_and_job_ops_refused(self):
        r = self.request("GET", "")
        self.assertEqual(r.status, 200)
        c = r.json()
        self.assertEqual(c["client"]["role"]["selected"], "anonymous")
        self.assertNotIn("xlogin", c["client"])
        self.assertEqual(c["server"]["siteName"], "DEMO-SITE")
        self.assert_error(self.request("GET", "/jobs"), 403)
        self.assert_error(self.request("POST", "/jobs", {}, {"Executable": "true"}), 403)

    def test_bad_credentials_get_403_with_error_body(self):
        for h in ({"Authorization": "Bearer wrong"},
                  {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()},
                  {"Authorization": "Basic !!!"},
                  {"Authorization": "Negotiate abc"}):
            e = self.assert_error(self.request("GET", "", h), 403)
            self.assertIn("Authentication failed", e["errorMessage"])

    def test_expired_token_refused_and_new_token_accepted(self):
        h = {"Authorization": "Bearer tok-alice-2"}
        self.assertEqual(self.request("GET", "", h).status, 200)
        self.control("POST", "/_control/faults", {"expire_token": "tok-alice-2"})
        e = self.assert_error(self.request("GET", "", h), 403)
        self.assertIn("expired", e["errorMessage"])
        self.control("POST", "/_control/faults", {"add_token": {"uid": "alice", "token": "tok-alice-3"}})
        r = self.request("GET", "", {"Authorization": "Bearer tok-alice-3"})
        self.assertEqual(r.json()["client"]["xlogin"]["UID"], "alice")

    def test_unknown_path_and_method(self):
        self.assert_error(self.request("GET", "/nothing-here", ALICE), 404)
        self.assert_error(self.request("GET", "/OTHER-SITE/rest/core".replace("/", "/", 1), ALICE), 404)
        self.assert_error(self.request("GET", "/jobs/00000000-0000-0000-0000-000000000000", ALICE), 404)
        self.assert_error(self.request("DELETE", "", ALICE), 405)

    # -- sessions, preferences -------------------------------------------------------------------

    def test_security_session_reuse_and_432(self):
        r = self.request("GET", "", ALICE)
        sid = r.headers["X-UNICORE-SecuritySession"]
        # the session alone authenticates
        r = self.request("GET", "", {"X-UNICORE-SecuritySession": sid})
        self.assertEqual(r.json()["client"]["xlogin"]["UID"], "alice")
        self.assertEqual(r.headers["X-UNICORE-SecuritySession"], sid)
        self.assert_error(self.request("GET", "", {"X-UNICORE-SecuritySession": "no-such-session"}), 432)
        self.control("POST", "/_control/faults", {"expire_sessions": True})
        r = self.request("GET", "", {"X-UNICORE-SecuritySession": sid})
        self.assert_error(r, 432)
        self.assertNotIn("X-UNICORE-SecuritySession", r.headers)
        # like the real server, a dead session id is refused even with credentials next to it
        h = dict(ALICE)
        h["X-UNICORE-SecuritySession"] = sid
        self.assert_error(self.request("GET", "", h), 432)
        # dropping it and retrying works, and yields a fresh session
        r = self.request("GET", "", ALICE)
        self.assertEqual(r.status, 200)
        self.assertNotEqual(r.headers["X-UNICORE-SecuritySession"], sid)

    def test_user_preferences(self):
        h = dict(ALICE)
        h["X-UNICORE-User-Preferences"] = "uid:alice,group:proj1,role:user"
        c = self.request("GET", "", h).json()
        self.assertEqual(c["client"]["xlogin"]["group"], "proj1")
        jid = self.submit({"Executable": "true"}, h)
        self.assertEqual(self.internal(jid)["group"], "proj1")
        self.assertEqual(self.job(jid)["submissionPreferences"]["group"], ["proj1"])
        for bad in ("group:nope", "uid:bob", "role:admin", "garbage"):
            h["X-UNICORE-User-Preferences"] = bad
            self.assert_error(self.request("GET", "", h), 403)

    # -- jobs -------------------------------------------------------------------------------------

    def test_submit_runs_through_states_and_files_are_readable(self):
        desc = {
            "Name": "fixture-job",
            "Executable": "./run.sh",
            "Arguments": ["one", "'two words'"],
            "Environment": ["GREETING=hello"],
            "Parameters": {"P1": "v1"},
            "Imports": [{"To": "run.sh", "Data": ["#!/bin/bash",
                                                 "echo \"$GREETING $P1 $1|$2 $SITE_PREFIX $SLURM_JOB_ID\" > out.txt",
                                                 "hostname > host.txt; ln -s /etc escape",
                                                 "while [ ! -e go ]; do sleep 0.05; done",
                                                 "echo to-stderr >&2", "echo done"],
                         "Permissions": "rwx------"}],
            "Resources": {"Runtime": "10min", "Queue": "gpus", "Nodes": 2, "GPUsPerNode": 1},
            "Tags": ["fixture", "t2"],
        }
        jid = self.submit(desc, hold=True)
        j = self.job(jid)
        self.assertIn(j["status"], ("READY", "QUEUED"))
        j = self.wait_status(jid, ("QUEUED",))
        self.assertRegex(j["batchSystemID"], r"^\d+$")
        self.assertEqual(j["queue"], "gpus")
        self.assertEqual(j["name"], "fixture-job")
        self.assertEqual(j["jobType"], "BATCH")
        self.assertEqual(j["tags"], ["fixture", "t2"])
        self.assertRegex(j["submissionTime"], DATE_RE)
        self.assertRegex(j["terminationTime"], DATE_RE)
        self.assertNotIn("exitCode", j)
        self.assertEqual(j["_links"]["self"]["href"], self.base + "/jobs/" + jid)
        self.assertEqual(j["_links"]["details"]["href"], self.base + "/jobs/%s/details" % jid)
        self.assertEqual(j["_links"]["action:abort"]["href"], self.base + "/jobs/%s/actions/abort" % jid)
        self.assertEqual(j["_links"]["workingDirectory"]["href"], self.base + "/storages/%s-uspace" % jid)
        self.assertEqual(self.request("GET", "/jobs/%s/details" % jid, ALICE).json(), {"rawDetailsData": "N/A"})
        self.control("POST", "/_control/jobs/" + jid, {"queue_delay": 0})
        j = self.wait_status(jid, ("RUNNING",))
        self.assertEqual(self.job(jid, fields="status,exitCode"), {"status": "RUNNING"})
        d = self.request("GET", "/jobs/%s/details" % jid, ALICE).json()
        self.assertEqual(d["NodeList"], NODE)
        self.assertEqual(d["BatchHost"], "cn0007")
        self.assertEqual(d["NumNodes"], "2")
        self.assertEqual(d["JobState"], "RUNNING")
        self.assertEqual(d["Partition"], "gpus")
        self.assertEqual(d["TimeLimit"], "00:10:00")
        self.assertEqual(d["JobId"], j["batchSystemID"])
        self.assertEqual(self.request("GET", "/jobs/%s/details?fields=NodeList" % jid, ALICE).json(),
                         {"NodeList": NODE})
        out = self.wait_file(jid, "out.txt").decode()
        self.assertEqual(out, "hello v1 one|two words batch %s\n" % j["batchSystemID"])
        self.upload(jid, "go", b"")
        j = self.wait_status(jid, ("SUCCESSFUL", "FAILED"))
        self.assertEqual(j["status"], "SUCCESSFUL", j["statusMessage"])
        self.assertEqual(j["exitCode"], "0")
        self.assertEqual(self.download(jid, "stdout").body, b"done\n")
        self.assertEqual(self.download(jid, "stderr").body, b"to-stderr\n")
        # storage and listing
        s = self.request("GET", "/storages/%s-uspace" % jid, ALICE).json()
        self.assertEqual(s["resourceStatus"], "READY")
        self.assertTrue(s["mountPoint"].endswith(jid + "/"))
        self.assertEqual(os.stat(s["mountPoint"]).st_mode & 0o777, 0o700)
        lst = self.request("GET", self.files_url(jid), ALICE).json()
        self.assertTrue(lst["isDirectory"])
        self.assertEqual(lst["permissions"], "rwx------")
        self.assertEqual(lst["content"]["/run.sh"]["permissions"], "rwx------")
        self.assertEqual(lst["content"]["/out.txt"]["size"], len(out))
        self.assertFalse(lst["content"]["/out.txt"]["isDirectory"])
        st = self.request("GET", self.files_url(jid, "out.txt"), ALICE)
        self.assertEqual(st.json()["size"], len(out))
        self.assertEqual(st.headers["Accept-Ranges"], "bytes")
        # ranges
        r = self.download(jid, "out.txt", {"Range": "bytes=6-7"})
        self.assertEqual((r.status, r.body), (206, b"v1"))
        self.assertEqual(r.headers["Content-Range"], "bytes 6-7/%d" % len(out))
        r = self.download(jid, "out.txt", {"Range": "bytes=-6"})
        self.assertEqual((r.status, r.body), (206, out[-6:].encode()))
        r = self.download(jid, "out.txt", {"Range": "bytes=3-"})
        self.assertEqual((r.status, r.body), (206, out[3:].encode()))
        self.assert_error(self.download(jid, "out.txt", {"Range": "bytes=9999-"}), 416)
        self.assert_error(self.download(jid, "out.txt", {"Range": "lines=1-2"}), 416)
        self.assert_error(self.download(jid, "", {}), 406)
        self.assert_error(self.download(jid, "missing.txt"), 404)
        # paths are confined to the job directory: '..' is clamped at its root, symlinks out are refused
        self.assert_error(self.download(jid, "../../../../etc/hostname"), 404)
        self.assert_error(self.download(jid, "escape/hostname"), 403)
        # tags: list by tag, modify with PUT application/json
        lst = self.request("GET", "/jobs?tags=fixture", ALICE).json()
        self.assertIn(self.base + "/jobs/" + jid, lst["jobs"])
        r = self.request("PUT", "/jobs/" + jid, ALICE, {"tags": ["other"], "status": "x"})
        self.assertEqual(r.json(), {"tags": "OK", "status": "Property not found or cannot be modified!"})
        self.assertNotIn(self.base + "/jobs/" + jid, self.request("GET", "/jobs?tags=fixture", ALICE).json()["jobs"])
        self.assertEqual(self.job(jid)["tags"], ["other"])
        self.assertEqual(self.request("GET", "/jobs/%s/details" % jid, ALICE).json()["JobState"], "COMPLETED")

    def test_client_stage_in_upload_then_start(self):
        jid = self.submit({"Executable": "cat sub/dir/input.bin > copy.bin; echo $SITE_PREFIX",
                           "haveClientStageIn": "true"})
        j = self.job(jid)
        self.assertEqual(j["status"], "READY")
        self.assertEqual(j["batchSystemID"], "N/A")
        data = bytes(range(256)) * 40
        self.upload(jid, "sub/dir/input.bin", data)  # parents created
        # PUT with application/json modifies properties, never content
        r = self.request("PUT", self.files_url(jid, "sub/dir/input.bin"), ALICE, {"permissions": "rw-------"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json(), {"permissions": "OK"})
        st = self.request("GET", self.files_url(jid, "sub/dir/input.bin"), ALICE).json()
        self.assertEqual((st["size"], st["permissions"]), (len(data), "rw-------"))
        # mkdir and delete
        self.assertEqual(self.request("POST", self.files_url(jid, "newdir"), ALICE, {}).status, 201)
        self.assertTrue(self.request("GET", self.files_url(jid), ALICE).json()["content"]["/newdir/"]["isDirectory"])
        self.assertEqual(self.request("DELETE", self.files_url(jid, "newdir"), ALICE).status, 204)
        self.assertNotIn("/newdir/", self.request("GET", self.files_url(jid), ALICE).json()["content"])
        self.assertEqual(self.job(jid)["status"], "READY")  # still waiting for the client
        r = self.request("POST", "/jobs/%s/actions/start" % jid, ALICE, {})
        self.assertEqual(r.status, 204, r.body)
        j = self.wait_status(jid, ("SUCCESSFUL", "FAILED"))
        self.assertEqual(j["status"], "SUCCESSFUL", j["statusMessage"])
        self.assertEqual(self.download(jid, "copy.bin").body, data)
        self.assertEqual(self.download(jid, "stdout").body, b"batch\n")

    def test_on_login_node_runs_without_job_prefix(self):
        jid = self.submit({"Executable": "echo \"[$SITE_PREFIX]\"", "Job type": "ON_LOGIN_NODE"})
        j = self.wait_status(jid, ("SUCCESSFUL", "FAILED"))
        self.assertEqual(j["status"], "SUCCESSFUL", j["statusMessage"])
        self.assertEqual(j["jobType"], "ON_LOGIN_NODE")
        self.assertEqual(self.download(jid, "stdout").body, b"[]\n")

    def test_abort_kills_the_process_tree(self):
        jid = self.submit({"Executable": "sleep 300 & echo $! > child.pid; echo $$ > main.pid; wait"})
        self.wait_status(jid, ("RUNNING",))
        child = int(self.wait_file(jid, "child.pid"))
        main = int(self.wait_file(jid, "main.pid"))
        self.assertTrue(pid_alive(child) and pid_alive(main))
        self.assertEqual(self.internal(jid)["pid"], main)
        r = self.request("POST", "/jobs/%s/actions/abort" % jid, ALICE, {})
        self.assertEqual(r.status, 204, r.body)
        j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"))
        self.assertEqual((j["status"], j["statusMessage"]), ("FAILED", "Job aborted."))
        self.assertFalse(pid_alive(child), "the job's child process survived abort")
        self.assertFalse(pid_alive(main))
        self.assertFalse(self.internal(jid)["alive"])

    def test_runtime_expiry_ends_job_failed_and_kills_everything(self):
        # The job ignores SIGTERM, so only the SIGKILL after the grace period ends it.
        jid = self.submit({"Executable": "trap '' TERM; sleep 300 & echo $! > child.pid; "
                                         "while true; do sleep 0.1; done",
                           "Resources": {"Runtime": 1}})
        self.wait_status(jid, ("RUNNING",))
        child = int(self.wait_file(jid, "child.pid"))
        j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"))
        self.assertEqual(j["status"], "FAILED")
        self.assertIn("TIME LIMIT", j["statusMessage"])
        self.assertIn("TIMEOUT", j["statusMessage"])
        self.assertEqual(j["exitCode"], "137")
        self.assertFalse(pid_alive(child))
        self.assertIn(b"DUE TO TIME LIMIT", self.download(jid, "stderr").body)
        self.assertEqual(self.request("GET", "/jobs/%s/details" % jid, ALICE).json()["JobState"], "TIMEOUT")

    def test_nonzero_exit_and_ignore(self):
        jid = self.submit({"Executable": "exit 3"})
        j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"))
        self.assertEqual(j["status"], "FAILED")
        self.assertEqual(j["exitCode"], "3")
        self.assertTrue(j["statusMessage"].startswith("User application exited with non-zero exit code: <3>."))
        jid = self.submit({"Executable": "exit 4", "IgnoreNonZeroExitCode": "true"})
        j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"))
        self.assertEqual((j["status"], j["exitCode"]), ("SUCCESSFUL", "4"))

    def test_invalid_jobs_fail_with_status_message(self):
        cases = [
            ({"Executable": "true", "Resources": {"Queue": "nope"}},
             "Partition/Queue <nope> is not available at this site."),
            ({"Executable": "true", "Resources": {"Queue": "gpus", "Frobs": 3}},
             "Resource <Frobs> is not available for partition <gpus>"),
            ({"Executable": "true", "Job type": "RAW", "BSS file": "x"}, "not supported"),
            ({"Executable": "true", "Resources": {"Runtime": "soon"}}, "Runtime"),
            ({"Arguments": ["x"]}, "No executable"),
            ({"Executable": "true", "Imports": [{"To": "x", "From": "https://example.org/x"}]}, "not supported"),
        ]
        for desc, msg in cases:
            jid = self.submit(desc)
            j = self.wait_status(jid, ("FAILED", "SUCCESSFUL"))
            self.assertEqual(j["status"], "FAILED", desc)
            self.assertIn(msg, j["statusMessage"])
            self.assertEqual(j["batchSystemID"], "N/A")
        h = dict(ALICE)
        h["Content-Type"] = "application/json"
        self.assert_error(self.request("POST", "/jobs", h, b"{not json"), 500)
        h["Content-Type"] = "text/plain"
        self.assert_error(self.request("POST", "/jobs", h, b"{}"), 415)

    def test_delete_kills_and_removes_directory(self):
        jid = self.submit({"Executable": "sleep 300 & echo $! > child.pid; wait"})
        self.wait_status(jid, ("RUNNING",))
        child = int(self.wait_file(jid, "child.pid"))
        jobdir = self.internal(jid)["dir"]
        self.assertTrue(os.path.isdir(jobdir))
        self.assert_error(self.request("DELETE", "/jobs/" + jid, BOB), 403)
        r = self.request("DELETE", "/jobs/" + jid, ALICE)
        self.assertEqual(r.status, 204, r.body)
        self.assertFalse(os.path.exists(jobdir))
        self.assertFalse(pid_alive(child))
        self.assert_error(self.request("GET", "/jobs/" + jid, ALICE), 404)

    def test_other_user_gets_403_everywhere(self):
        jid = self.submit({"Executable": "echo secret > s.txt"})
        self.wait_status(jid, ("SUCCESSFUL",))
        for method, path, body in (("GET", "/jobs/" + jid, None), ("GET", "/jobs/%s/details" % jid, None),
                                   ("POST", "/jobs/%s/actions/abort" % jid, {}),
                                   ("PUT", "/jobs/" + jid, {"tags": ["x"]}),
                                   ("GET", "/storages/%s-uspace" % jid, None),
                                   ("GET", self.files_url(jid, "s.txt"), None),
                                   ("PUT", self.files_url(jid, "s.txt"), b"overwritten"),
                                   ("DELETE", self.files_url(jid, "s.txt"), None),
                                   ("DELETE", "/jobs/" + jid, None)):
            self.assert_error(self.request(method, path, BOB, body), 403)
        self.assertNotIn(self.base + "/jobs/" + jid, self.request("GET", "/jobs", BOB).json()["jobs"])
        self.assertEqual(self.download(jid, "s.txt").body, b"secret\n")

    def test_list_paging(self):
        ids = [self.submit({"Executable": "true", "Tags": ["paging"]}) for _ in range(3)]
        r = self.request("GET", "/jobs?tags=paging&offset=1&num=1", ALICE).json()
        self.assertEqual(r["jobs"], [self.base + "/jobs/" + ids[1]])
        self.assertIn("next", r["_links"])
        self.assertIn("previous", r["_links"])
        self.assertIn("self", r["_links"])

    def test_submission_disabled(self):
        self.control("POST", "/_control/faults", {"submission_enabled": False})
        self.assert_error(self.request("POST", "/jobs", ALICE, {"Executable": "true"}), 503)
        self.assertFalse(self.request("GET", "", ALICE).json()["server"]["jobSubmission"]["enabled"])

    # -- fault injection, recording -----------------------------------------------------------------

    def test_503_burst(self):
        self.control("POST", "/_control/faults", {"fail_next": {"count": 3, "status": 503}})
        for _ in range(3):
            self.control("GET", "/_control/faults")  # control requests are not affected
            self.assert_error(self.request("GET", "", ALICE), 503)
        self.assertEqual(self.request("GET", "", ALICE).status, 200)
        self.control("POST", "/_control/faults", {"fail_next": {"count": 1, "status": 500, "body": "<h1>oops</h1>",
                                                                "content_type": "text/html"}})
        r = self.request("GET", "", ALICE)
        self.assertEqual((r.status, r.headers["Content-Type"], r.body), (500, "text/html", b"<h1>oops</h1>"))

    def test_garbage_kinds(self):
        self.control("POST", "/_control/faults", {"garbage_next": {"kind": "html"}})
        r = self.request("GET", "", ALICE)
        self.assertEqual((r.status, r.headers["Content-Type"]), (502, "text/html"))
        self.assertIn(b"<html>", r.body)
        for kind in ("truncated_json", "not_json_200"):
            self.control("POST", "/_control/faults", {"garbage_next": {"kind": kind}})
            r = self.request("GET", "", ALICE)
            self.assertEqual(r.status, 200)
            self.assertRaises(ValueError, r.json)
        self.control("POST", "/_control/faults", {"garbage_next": {"kind": "huge", "size": 3 * 1024 * 1024}})
        r = self.request("GET", "", ALICE)
        self.assertEqual((r.status, len(r.body)), (200, 3 * 1024 * 1024))
        self.control("POST", "/_control/faults", {"garbage_next": {"kind": "missing_fields"}})
        r = self.request("GET", "", ALICE)
        self.assertEqual(r.status, 200)
        self.assertNotIn("client", r.json())
        self.assertNotIn("server", r.json())
        self.assertEqual(self.request("GET", "", ALICE).json()["client"]["xlogin"]["UID"], "alice")
        self.assert_error(self.request("POST", "/_control/faults", body={"garbage_next": {"kind": "bogus"}}), 400)

    def test_connection_drop_and_hang(self):
        self.control("POST", "/_control/faults", {"garbage_next": {"kind": "drop", "match": "/jobs"}})
        self.assertEqual(self.request("GET", "", ALICE).status, 200)  # does not match: answered
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionError)):
            self.request("GET", "/jobs", ALICE)
        self.assertEqual(self.request("GET", "/jobs", ALICE).status, 200)
        self.control("POST", "/_control/faults", {"garbage_next": {"kind": "hang", "seconds": 5}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=0.5)
        try:
            conn.request("GET", self.base_path, headers=ALICE)
            with self.assertRaises(TimeoutError):
                conn.getresponse()
        finally:
            conn.close()
        self.assertEqual(self.request("GET", "", ALICE).status, 200)  # other connections are served meanwhile

    def test_latency(self):
        self.control("POST", "/_control/faults", {"latency_ms": 300})
        t0 = time.monotonic()
        self.assertEqual(self.request("GET", "", ALICE).status, 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)  # a lower bound, not a performance assertion

    def test_request_recording(self):
        jid = self.submit({"Executable": "true", "haveClientStageIn": "true"})
        self.control("GET", "/_control/requests?clear=1")
        h = dict(ALICE)
        h["X-UNICORE-User-Preferences"] = "group:proj1"
        h["Content-Type"] = "application/octet-stream"
        payload = b"\x00\x01binary\xff"
        self.assertEqual(self.request("PUT", self.files_url(jid, "in.bin"), h, payload).status, 204)
        recs = self.control("GET", "/_control/requests?clear=1")
        self.assertEqual(len(recs), 1)
        rec = recs[0]
        self.assertEqual(rec["method"], "PUT")
        self.assertEqual(rec["path"], self.base_path + self.files_url(jid, "in.bin"))
        self.assertEqual(rec["headers"]["Content-Type"], "application/octet-stream")
        self.assertEqual(rec["headers"]["Authorization"], "Bearer tok-alice")
        self.assertEqual(rec["headers"]["X-UNICORE-User-Preferences"], "group:proj1")
        self.assertEqual(base64.b64decode(rec["body_b64"]), payload)
        self.assertEqual(self.control("GET", "/_control/requests"), [])


class SiteLifecycleTest(unittest.TestCase):
    def test_sigterm_kills_jobs_and_exits_zero(self):
        tmp = tempfile.mkdtemp(prefix="usite_test.")
        try:
            proc, base, port = start_site(tmp)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", urllib.parse.urlsplit(base).path + "/jobs",
                             body=json.dumps({"Executable": "sleep 300 & echo $! > c.pid; wait"}),
                             headers={"Content-Type": "application/json", **ALICE})
                r = conn.getresponse()
                r.read()
                conn.close()
                self.assertEqual(r.status, 201)
                jobdir = os.path.join(tmp, "state", "jobs", r.headers["Location"].rsplit("/", 1)[1])
                end = time.time() + 20
                while not (os.path.exists(os.path.join(jobdir, "c.pid")) and
                           os.path.getsize(os.path.join(jobdir, "c.pid")) > 0):
                    self.assertLess(time.time(), end, "job never started")
                    time.sleep(0.05)
                with open(os.path.join(jobdir, "c.pid")) as f:
                    child = int(f.read())
                self.assertTrue(pid_alive(child))
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(timeout=15), 0)
                self.assertFalse(pid_alive(child))
            finally:
                stop_site(proc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_job_prefix_runs_batch_jobs_in_a_namespace(self):
        """--job-prefix nsenter: BATCH jobs run in a namespace this test creates, the node name is learnt
        from its UTS namespace; ON_LOGIN_NODE jobs stay on the site's host."""
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter") or not shutil.which("unshare"):
            self.skipTest("needs root, ip, nsenter and unshare")
        ns = "usite%d" % os.getpid()
        tmp = tempfile.mkdtemp(prefix="usite_test.")
        uts = os.path.join(tmp, "uts")
        open(uts, "w").close()
        made_ns = made_uts = False
        try:
            if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
                self.skipTest("cannot create network namespaces here")
            made_ns = True
            if subprocess.run(["unshare", "--uts=" + uts, "hostname", "cn-ns-test"],
                              capture_output=True).returncode != 0:
                self.skipTest("cannot create a persistent UTS namespace here")
            made_uts = True
            # the host's interfaces, for comparison with what the job sees
            # (/proc/net/dev follows the network namespace; /sys/class/net would not under nsenter)
            with open("/proc/net/dev") as f:
                host_ifaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
            proc, base, port = start_site(tmp, ["--job-prefix", "nsenter --net=/run/netns/%s --uts=%s --" % (ns, uts),
                                                "--node-name", ""])
            try:
                path = urllib.parse.urlsplit(base).path

                def call(method, p, body=None):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    try:
                        h = {"Accept": "application/json", "Content-Type": "application/json", **ALICE}
                        conn.request(method, path + p, body=json.dumps(body) if body is not None else None,
                                     headers=h)
                        r = conn.getresponse()
                        return r.status, r.headers, r.read()
                    finally:
                        conn.close()

                def run(desc):
                    st, h, _ = call("POST", "/jobs", desc)
                    self.assertEqual(st, 201)
                    jid = h["Location"].rsplit("/", 1)[1]
                    end = time.time() + 20
                    while True:
                        j = json.loads(call("GET", "/jobs/" + jid)[2])
                        if j["status"] in ("SUCCESSFUL", "FAILED"):
                            break
                        self.assertLess(time.time(), end)
                        time.sleep(0.05)
                    self.assertEqual(j["status"], "SUCCESSFUL", j["statusMessage"])
                    with open(os.path.join(tmp, "state", "jobs", jid, "stdout")) as f:
                        return jid, f.read().split()

                list_ifaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
                jid, out = run({"Executable": list_ifaces + "; hostname", "Arguments": []})
                self.assertEqual(out, ["lo", "cn-ns-test"])
                d = json.loads(call("GET", "/jobs/%s/details" % jid)[2])
                self.assertEqual((d["NodeList"], d["BatchHost"]), ("cn-ns-test", "cn-ns-test"))
                _, out = run({"Executable": list_ifaces, "Job type": "ON_LOGIN_NODE"})
                self.assertEqual(sorted(out), host_ifaces)
            finally:
                stop_site(proc)
        finally:
            if made_uts:
                subprocess.run(["umount", uts], capture_output=True)
            if made_ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)

    def test_tls(self):
        openssl = shutil.which("openssl")
        if not openssl:
            self.skipTest("openssl CLI not available to make a test certificate")
        import ssl
        tmp = tempfile.mkdtemp(prefix="usite_test.")
        try:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                            "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True)
            proc, base, port = start_site(tmp, ["--tls-cert", cert, "--tls-key", key])
            try:
                self.assertTrue(base.startswith("https://127.0.0.1:%d/" % port))
                ctx = ssl.create_default_context(cafile=cert)
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
                conn.request("GET", urllib.parse.urlsplit(base).path, headers=ALICE)
                r = conn.getresponse()
                c = json.loads(r.read())
                self.assertEqual(r.status, 200)
                self.assertEqual(c["server"]["credential"]["dn"], "commonName=127.0.0.1")
                self.assertTrue(c["_links"]["jobs"]["href"].startswith("https://"))
                conn.close()
                # an untrusting client fails the handshake; the site keeps serving
                with self.assertRaises(ssl.SSLError):
                    c2 = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(),
                                                     timeout=30)
                    try:
                        c2.request("GET", "/")
                    finally:
                        c2.close()
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
                conn.request("GET", urllib.parse.urlsplit(base).path)
                self.assertEqual(conn.getresponse().status, 200)
                conn.close()
            finally:
                stop_site(proc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
