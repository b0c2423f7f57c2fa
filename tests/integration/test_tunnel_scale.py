"""50 kernels (real ipykernels, each behind its own agent) over ONE SSH connection, executing at
the same time; each answers with its own result."""
import os
import threading

import kbtest
from kbtest import Agent, Tunnel, blocking_client, run_cell, wait_kernel_info

KERNELS = int(os.environ.get("KB_SCALE_KERNELS", "50"))


class TunnelScaleTest(kbtest.SiteTestCase):
    needs_netns = False

    def test_many_kernels_one_connection(self):
        agents, kernels = [], []
        try:
            for i in range(KERNELS):
                a = Agent(self.site, os.path.join(self.tmp, f"k{i}"))
                agents.append(a)
                cf = kbtest.write_connection_file(os.path.join(self.tmp, f"k{i}.json"))
                kernels.append((cf, a.endpoint, a.secret_file))
            tunnel = Tunnel(self.site, kernels, self.tmp)
            agents.append(tunnel)
            for i in range(KERNELS):
                tunnel.wait_for("kernel_started", i, timeout=300)
            clients = [blocking_client(cf) for cf, _, _ in kernels]
            for kc in clients:
                wait_kernel_info(kc, timeout=300)
            results, errors = {}, []

            def run(i, kc):
                try:
                    code = f"import time\nx = {i} * 1000\nfor j in range(5):\n    time.sleep(0.1)\nprint(x + 7)"
                    reply, out, _ = run_cell(kc, code, timeout=300)
                    results[i] = (reply["content"]["status"], out.strip())
                except Exception as e:  # reported below with the kernel's index
                    errors.append((i, repr(e)))

            threads = [threading.Thread(target=run, args=(i, kc)) for i, kc in enumerate(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(errors, [])
            for i in range(KERNELS):
                self.assertEqual(results[i], ("ok", str(i * 1000 + 7)), f"kernel {i}")
            # Exactly one SSH connection carried all of them.
            ssh_events = [e for e in tunnel.events if e.get("event") == "ssh" and e.get("state") == "connected"]
            self.assertEqual(len(ssh_events), 1, ssh_events)
            r = self.site.run("login", ["ss", "-Htn", "state", "established",
                                        f"( sport = :{self.site.info['ssh_port']} )"],
                              capture_output=True, text=True)
            self.assertEqual(len([l for l in r.stdout.splitlines() if l.strip()]), 1, r.stdout)
            for kc in clients:
                kc.stop_channels()
        finally:
            for a in reversed(agents):
                a.stop()


if __name__ == "__main__":
    kbtest.main()
