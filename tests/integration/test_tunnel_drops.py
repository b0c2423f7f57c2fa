"""Drop tests: with an execute in flight and iopub streaming, the SSH connection is broken three ways:
(a) the sshd process serving the connection is killed, (b) sshd is restarted, (c) the hub<->login
link goes down for 20 s. After each: the execute_reply arrives exactly once, every printed number
arrives once and in order, the kernel's variables survive, the kernel is the same process, the
tunnel never reports the kernel gone, and the heartbeat beats again.

Needs network namespaces (the link-down case takes a veth down); skipped otherwise.
"""
import queue
import threading
import time

import kbtest
from kbtest import log, run_cell


class TunnelDropTest(kbtest.OneKernelTestCase):
    needs_netns = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        reply, _, _ = run_cell(cls.kc, "state = {'kept': 12345}")
        assert reply["content"]["status"] == "ok", reply

    def run_through_fault(self, name, fault, count, delay):
        """Runs a cell printing 0..count-1 (one number every `delay` s) and calls fault() once 20
        numbers have arrived. Returns after the kernel went idle."""
        kc = self.kc
        events_before = len(self.tunnel.events)
        code = (f"import time\nfor i in range({count}):\n    print(i)\n    time.sleep({delay})\n"
                f"state['kept']")
        msg_id = kc.execute(code)
        numbers, results, faulted = [], [], False
        buffered = ""
        deadline = time.time() + count * delay + 120
        while True:
            left = deadline - time.time()
            self.assertGreater(left, 0, f"{name}: the run did not finish; got {len(numbers)} numbers")
            try:
                msg = kc.get_iopub_msg(timeout=min(left, 5))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            mtype = msg["msg_type"]
            if mtype == "stream" and msg["content"]["name"] == "stdout":
                buffered += msg["content"]["text"]
                *lines, buffered = buffered.split("\n")
                numbers.extend(int(x) for x in lines if x.strip())
            elif mtype == "execute_result":
                results.append(msg["content"]["data"]["text/plain"])
            elif mtype == "status" and msg["content"]["execution_state"] == "idle":
                break
            if not faulted and len(numbers) >= 20:
                log(f"{name}: injecting fault after {len(numbers)} numbers")
                self.healed_at = None
                fault()
                self.fault_at = time.time()
                faulted = True
        self.assertTrue(faulted, f"{name}: the fault was never injected")
        if buffered.strip():
            numbers.append(int(buffered))

        replies = []
        reply = kc.get_shell_msg(timeout=60)
        replies.append(reply)
        try:  # a duplicated reply would show up right behind the first one
            while True:
                replies.append(kc.get_shell_msg(timeout=3))
        except queue.Empty:
            pass
        mine = [r for r in replies if r["parent_header"].get("msg_id") == msg_id]
        self.assertEqual(len(mine), 1, f"{name}: execute_reply arrived {len(mine)} times")
        self.assertEqual(mine[0]["content"]["status"], "ok", mine[0]["content"])
        self.assertEqual(numbers, list(range(count)),
                         f"{name}: printed numbers lost, duplicated or reordered")
        self.assertEqual(results, ["12345"])

        # The kernel's state survived and it is the same kernel process.
        reply, out, _ = run_cell(kc, "print(state['kept'] + 1)")
        self.assertEqual(out.strip(), "12346")
        self.assertEqual(len(self.tunnel.find("kernel_started")), 1, self.tunnel.events)
        for bad in ("kernel_exited", "closed", "agent_terminating"):
            self.assertEqual(self.tunnel.find(bad), [], f"{name}: tunnel reported {bad}")
        self.assertIsNone(self.tunnel.proc.poll(), f"{name}: tunnel process exited")
        self.assertIsNone(self.agent.proc.poll(), f"{name}: agent exited")
        # The link really went down and came back (otherwise the test proved nothing).
        self.assertTrue(self.tunnel.find("link_down", 0, after=events_before),
                        f"{name}: the fault did not break the link: {self.tunnel.events[-5:]}")
        ups = self.tunnel.find("link_up", 0, after=events_before)
        self.assertTrue(ups)
        healed = getattr(self, "healed_at", None) or self.fault_at
        log(f"{name}: link back {ups[-1]['_t'] - healed:.2f} s after the fault ended "
            f"(link_down events: {len(self.tunnel.find('link_down', 0, after=events_before))})")
        # Jupyter's session rejects replays loudly; the kernel must never have seen one.
        self.assertNotIn("Duplicate Signature", self.agent.log())
        # Heartbeat answers again.
        self.assertTrue(kbtest.wait_beating(kc), f"{name}: heartbeat did not come back")

    def test_a_kill_sshd_session(self):
        self.run_through_fault("kill sshd session", self.site.kill_sshd_sessions, 200, 0.05)

    def test_b_restart_sshd(self):
        self.run_through_fault("restart sshd", self.site.restart_sshd, 200, 0.05)

    def test_c_link_down_20s(self):
        timer = []

        def heal():
            self.site.link_up()
            self.healed_at = time.time()

        def fault():
            self.site.link_down()
            t = threading.Timer(20.0, heal)
            t.start()
            timer.append(t)

        try:
            self.run_through_fault("link down 20 s", fault, 700, 0.05)
        finally:
            for t in timer:
                t.join()
            self.site.link_up()


if __name__ == "__main__":
    kbtest.main()
