#!/usr/bin/python3
"""The benchmarks still run end to end on this machine and print what they promise.

Not a performance test: no figure is compared with a target or a time (benchmarks print, tests do
not time). It runs bench/tunnel --quick and bench/lifecycle with few samples, and checks that each
ends with one JSON object holding every documented key with a positive number (a broken path —
a missing package such as socat or iperf3, a changed CLI, a crashed helper — fails here, in CI,
instead of on the next person who wants figures).
"""
import json
import os
import subprocess
import sys
import unittest

SRC = os.environ.get("KB_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PY = os.environ.get("KB_PYTHON", "/usr/bin/python3")

TUNNEL_KEYS = ["rtt_p50_us_direct", "rtt_p50_us_bridge", "rtt_p50_us_ssh", "rtt_p99_us_bridge",
               "hb_p99_ms_flood", "thr_mbps_bridge", "thr_mbps_ssh", "thr_mbps_bridge_down",
               "thr_mbps_ssh_down", "thr_mbps_link_nossh",
               "thr_mbps_link_nossh_down", "thr_mbps_ssh_relay", "thr_mbps_ssh_relay_down"]
LIFECYCLE_KEYS = ["start_to_ready_ms", "restart_ms", "rtt_p50_us_bridge", "reattach_ms",
                  "reattach_kernels", "planned_restart_lines", "stop_start_lines"]


def run(argv, timeout):
    env = dict(os.environ, KB_SOURCE_DIR=SRC)
    r = subprocess.run([PY] + argv, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\n"
                             f"stderr:\n{r.stderr[-3000:]}")
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError(f"{argv[0]} printed nothing; stderr:\n{r.stderr[-3000:]}")
    return r.stdout, json.loads(lines[-1])


class BenchSmoke(unittest.TestCase):
    def check_numbers(self, result, keys):
        for k in keys:
            self.assertIn(k, result)
            self.assertIsInstance(result[k], (int, float), k)
            self.assertGreater(result[k], 0, k)

    def test_tunnel_quick(self):
        out, result = run([os.path.join(SRC, "bench", "tunnel"), "--quick", "--kernels", "20",
                           "--default-cipher-pair"], timeout=600)
        self.check_numbers(result, TUNNEL_KEYS)
        # A difference of two RSS readings: present and a number, but noise may take it to <= 0.
        self.assertIsInstance(result.get("rss_kb_per_kernel"), (int, float))
        self.assertEqual(result["cipher"], "aes128-gcm@openssh.com")
        self.assertEqual(result.get("default_cipher"), "chacha20-poly1305@openssh.com")
        self.check_numbers(result, ["thr_mbps_bridge_default_cipher", "thr_mbps_ssh_default_cipher",
                                    "thr_mbps_bridge_down_default_cipher",
                                    "thr_mbps_ssh_down_default_cipher"])
        # With namespaces the round trips are measured again at MTU 9000 (not on loopback hosts).
        self.assertIn(result.get("site_mode"), ("netns", "loopback"))
        if result["site_mode"] == "netns":
            self.check_numbers(result, ["rtt_p50_us_bridge_mtu9000", "rtt_p50_us_ssh_mtu9000"])
            self.assertIn("kernel_info p50 bridge, MTU 9000", out)
        for run_name in ("bridge", "ssh", "bridge_down", "ssh_down", "link_nossh", "ssh_relay"):
            cpu = result["cpu_pct_per_gbps"][run_name]
            self.assertGreater(cpu["busy"], 0, run_name)
        # The table a person reads comes before the JSON line.
        self.assertIn("throughput bridge kernel->client", out)
        self.assertIn("control: link without SSH", out)

    def test_lifecycle_few_samples(self):
        _, result = run([os.path.join(SRC, "bench", "lifecycle"), "--runs", "1", "--rtt", "20",
                         "--reattach-kernels", "3"],
                        timeout=600)
        self.check_numbers(result, LIFECYCLE_KEYS)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("skipped: the benchmarks need root (network namespaces)")
        sys.exit(77)
    unittest.main()
