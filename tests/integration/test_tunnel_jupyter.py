"""A real jupyter_client talks to a real ipykernel in the compute host through
bridge (kernel-bridge tunnel, hub) -> OpenSSH sshd (login) -> agent (compute).

Shows: kernel_info, execute, stream output, stdin (input()), interrupt (agent SIGINT and
interrupt_request on control), heartbeat.
"""
import json
import time

import kbtest
from kbtest import run_cell, wait_kernel_info


class TunnelJupyterTest(kbtest.OneKernelTestCase):
    needs_netns = False  # works on loopback too; isolation is tested in test_tunnel_isolation.py

    def test_kernel_info_round_trip(self):
        reply = wait_kernel_info(self.kc)
        self.assertEqual(reply["content"]["implementation"], "ipython")
        self.assertEqual(reply["msg_type"], "kernel_info_reply")

    def test_execute_prints_compute_hostname(self):
        reply, out, _ = run_cell(self.kc, "import socket; print(socket.gethostname())")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(out.strip(), self.site.info["hosts"]["compute"]["hostname"])

    def test_stream_output_in_order(self):
        reply, out, _ = run_cell(self.kc, "for i in range(2000): print(i)")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(out.split(), [str(i) for i in range(2000)])

    def test_stdin_input(self):
        prompts = []

        def answer(msg):
            prompts.append(msg["content"]["prompt"])
            self.kc.input("forty-two")

        reply, out, _ = run_cell(self.kc, "x = input('your answer? '); print('got', x)",
                                 stdin_hook=answer)
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(prompts, ["your answer? "])
        self.assertIn("got forty-two", out)

    def test_interrupt_through_agent_sigint(self):
        # stop_on_error=False: the KeyboardInterrupt must not make ipykernel abort the next test's request
        msg_id = self.kc.execute("import time; time.sleep(60)", stop_on_error=False)
        time.sleep(1.0)  # let the kernel enter the sleep
        t0 = time.time()
        self.tunnel.command("interrupt 0")
        reply = self.kc.get_shell_msg(timeout=30)
        self.assertEqual(reply["parent_header"]["msg_id"], msg_id)
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(reply["content"]["ename"], "KeyboardInterrupt")
        self.assertLess(time.time() - t0, 30)
        # The kernel is still the same process and still answers.
        wait_kernel_info(self.kc)
        self.assertEqual(len(self.tunnel.find("kernel_started", 0)), 1)

    def test_interrupt_request_on_control(self):
        # stop_on_error=False: the KeyboardInterrupt must not make ipykernel abort the next test's request
        msg_id = self.kc.execute("import time; time.sleep(60)", stop_on_error=False)
        time.sleep(1.0)
        req = self.kc.session.msg("interrupt_request", {})
        self.kc.control_channel.send(req)
        ctl = self.kc.get_control_msg(timeout=30)
        self.assertEqual(ctl["msg_type"], "interrupt_reply")
        reply = self.kc.get_shell_msg(timeout=30)
        self.assertEqual(reply["parent_header"]["msg_id"], msg_id)
        self.assertEqual(reply["content"]["ename"], "KeyboardInterrupt")

    def test_heartbeat(self):
        import zmq
        with open(self.cf) as f:
            info = json.load(f)
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{info['hb_port']}")
        try:
            for i in range(20):
                payload = b"ping-%d" % i
                req.send(payload)
                self.assertTrue(req.poll(10000), "no heartbeat echo within 10 s")
                self.assertEqual(req.recv(), payload)
        finally:
            req.close()
        self.assertTrue(kbtest.wait_beating(self.kc), "jupyter_client's HBChannel is not beating")


if __name__ == "__main__":
    kbtest.main()
