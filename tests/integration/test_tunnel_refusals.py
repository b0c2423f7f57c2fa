"""Refusals: a changed SSH host key and a wrong agent secret are each refused with a clear error,
and neither forwards a single byte (the kernel is never even started)."""
import os
import socket
import subprocess
import time

import kbtest
from kbtest import Agent, Tunnel


class TunnelRefusalTest(kbtest.SiteTestCase):
    needs_netns = False  # works on loopback addresses too

    def setUp(self):
        self.objs = []

    def tearDown(self):
        for o in reversed(self.objs):
            o.stop()

    def client_bytes_go_nowhere(self, cf):
        """A client connects to the hub-side shell port and sends a ZMTP greeting: nothing answers."""
        import json
        with open(cf) as f:
            info = json.load(f)
        s = socket.create_connection(("127.0.0.1", info["shell_port"]), timeout=5)
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03")
        s.settimeout(3)
        try:
            data = s.recv(64)
        except socket.timeout:
            data = b""
        except ConnectionError:
            data = b""
        s.close()
        return data

    def test_changed_host_key_is_refused(self):
        agent = Agent(self.site, os.path.join(self.tmp, "hk"))
        self.objs.append(agent)
        # A known_hosts that names the login host with a different key.
        other = os.path.join(self.tmp, "other_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
        pub = open(other + ".pub").read().split()
        host = self.site.info["login_addr"]
        port = self.site.info["ssh_port"]
        name = host if port == 22 else f"[{host}]:{port}"
        kh = os.path.join(self.tmp, "known_hosts_changed")
        with open(kh, "w") as f:
            f.write(f"{name} {pub[0]} {pub[1]}\n")
        cf = kbtest.write_connection_file(os.path.join(self.tmp, "hk.json"))
        tunnel = Tunnel(self.site, [(cf, agent.endpoint, agent.secret_file)], self.tmp,
                        ssh_overrides={"known_hosts": kh})
        self.objs.append(tunnel)
        tunnel.wait_for("ssh", timeout=30)
        deadline = time.time() + 30
        while not tunnel.find("ssh") or tunnel.find("ssh")[-1].get("state") != "failed":
            self.assertLess(time.time(), deadline, tunnel.events)
            time.sleep(0.2)
        reason = tunnel.find("ssh")[-1].get("reason", "")
        self.assertIn(host, reason)
        self.assertIn("SHA256:", reason)
        self.assertEqual(self.client_bytes_go_nowhere(cf), b"")
        self.assertEqual(tunnel.find("link_up"), [])
        self.assertEqual(tunnel.find("kernel_started"), [])
        self.assertNotIn("kernel started", agent.log().lower())
        # The agent never saw an authenticated bridge.
        self.assertNotIn("authenticated", agent.log().lower())

    def test_wrong_agent_secret_is_refused(self):
        agent = Agent(self.site, os.path.join(self.tmp, "ws"))
        self.objs.append(agent)
        wrong = kbtest.write_secret(os.path.join(self.tmp, "wrong.secret"))
        cf = kbtest.write_connection_file(os.path.join(self.tmp, "ws.json"))
        tunnel = Tunnel(self.site, [(cf, agent.endpoint, wrong)], self.tmp)
        self.objs.append(tunnel)
        tunnel.wait_for("listening", 0)
        deadline = time.time() + 30
        while not (tunnel.find("error", 0) or tunnel.find("link_down", 0) or tunnel.find("closed", 0)):
            self.assertLess(time.time(), deadline, f"no refusal reported: {tunnel.events}")
            time.sleep(0.2)
        text = " ".join(str(e) for e in tunnel.events).lower()
        self.assertIn("auth", text)
        self.assertEqual(self.client_bytes_go_nowhere(cf), b"")
        self.assertEqual(tunnel.find("link_up"), [])
        self.assertEqual(tunnel.find("kernel_started"), [])
        self.assertIn("auth", agent.log().lower())


if __name__ == "__main__":
    kbtest.main()
