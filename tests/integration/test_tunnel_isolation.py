"""Isolation on the site in a box (needs network namespaces, else skipped): the kernel's ports are
bound to 127.0.0.1 of the compute host and refuse connections from the login host, and the hub
cannot reach the compute host except through the tunnel.
"""
import json
import os
import socket

import kbtest


class TunnelIsolationTest(kbtest.OneKernelTestCase):
    needs_netns = True

    def test_kernel_ports_refuse_from_login(self):
        """The kernel binds 127.0.0.1 of the compute host: nothing from another host reaches it."""
        conn = None
        runtime = os.path.join(self.agent.workdir, "runtime")
        for root, _, files in os.walk(runtime):
            for f in files:
                if f.endswith(".json"):
                    conn = os.path.join(root, f)
        self.assertIsNotNone(conn, f"no connection file under {runtime}")
        self.assertEqual(os.stat(conn).st_mode & 0o777, 0o600)
        info = json.load(open(conn))
        self.assertEqual(info["ip"], "127.0.0.1")
        compute = self.site.info["compute_addr"]
        probe = ("import socket,sys\n"
                 "s=socket.socket(); s.settimeout(3)\n"
                 "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
                 "except OSError as e: print('refused', e)\n")
        for ch in kbtest.CHANNELS:
            r = self.site.run("login", [kbtest.PY, "-c", probe, compute, str(info[f"{ch}_port"])],
                              capture_output=True, text=True, timeout=30)
            self.assertIn("refused", r.stdout, f"{ch} port reachable from login: {r.stdout}")

    def test_hub_cannot_reach_compute(self):
        s = socket.socket()
        s.settimeout(3)
        with self.assertRaises(OSError):
            s.connect((self.site.info["compute_addr"], self.agent.info["port"]))
        s.close()



if __name__ == "__main__":
    kbtest.main()
