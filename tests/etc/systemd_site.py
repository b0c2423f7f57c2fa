"""Runs inside the systemd container of test_systemd_service.py (as root, by /usr/bin/python3): a
site in a box on loopback addresses (the container has no other network) with OpenSSH and the
UNICORE test site, a kernel-bridge configuration for it installed where the unit reads it, the
unit restarted, then a kernel started the way Jupyter starts one (jupyter_client, a kernelspec from
`kernel-bridge kernelspec install`) through the daemon that systemd runs. Prints one JSON object
with what it saw; the outer test asserts on it. Everything it started is stopped before it exits.
"""
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))

from kbfront import FrontSite, kernel_manager, ready_client, start  # noqa: E402
import kbtest  # noqa: E402

SOCKET = "/run/kernel-bridge/api.sock"
ETC = "/etc/kernel-bridge"


def install_for_daemon(src, name):
    """A copy of a site-in-a-box file the daemon can read (it has a private /tmp)."""
    dst = os.path.join(ETC, name)
    shutil.copyfile(src, dst)
    u = pwd.getpwnam("kernel-bridge")
    os.chown(dst, u.pw_uid, u.pw_gid)
    os.chmod(dst, 0o600)
    return dst


def main():
    out = {}
    fs = FrontSite(serve=False, loopback=True, users=("root",), queue_delay=0.5,
                   restart_grace="5s", log_level="info",
                   extra_bridge_toml='on_stop = "keep-kernels"')
    with fs:
        path = fs.write_config(os.path.join(fs.dir, "daemon.toml"))
        text = open(path).read()
        known_hosts = install_for_daemon(fs.info["known_hosts"], "site-known_hosts")
        identity = install_for_daemon(fs.info["identity"], "site-id")
        text = re.sub(r'(?m)^state_dir = .*$', 'state_dir = "/var/lib/kernel-bridge"', text)
        text = re.sub(r'(?m)^unix_socket = .*$', f'unix_socket = "{SOCKET}"', text)
        text = re.sub(r'(?m)^admin_users = .*$', 'admin_users = ["root"]', text)
        text = re.sub(r'(?m)^known_hosts = .*$', f'known_hosts = "{known_hosts}"', text)
        text = re.sub(r'(?m)^ssh_identity = .*$', f'ssh_identity = "{identity}"', text)
        with open(os.path.join(fs.dir, "daemon.toml"), "w") as f:
            f.write(text)
        subprocess.run(["install", "-m", "0640", "-o", "root", "-g", "kernel-bridge",
                        os.path.join(fs.dir, "daemon.toml"), f"{ETC}/kernel-bridge.toml"], check=True)
        subprocess.run(["systemctl", "restart", "kernel-bridge"], check=True)
        fs.socket_path = SOCKET  # fs.api() and the kernelspec talk to the daemon systemd runs
        fs.wait_api(ok=(200,))
        fs.push_token("root")
        fs.install_kernelspec("kb-systemd", "--runtime", "30m")
        km = kernel_manager("kb-systemd", os.path.join(fs.dir, "wrapper.log"))
        t0 = time.time()
        start(km)
        try:
            kc = ready_client(km, timeout=120)
            out["ready_s"] = round(time.time() - t0, 2)
            reply, stream, _ = kbtest.run_cell(kc, "x = 6 * 7; print(x)")
            out["reply_status"] = reply["content"]["status"]
            out["stream"] = stream
            kernels = fs.kernels()
            out["kernel"] = kernels[0] if kernels else None
            # `systemctl restart` with the kernel running (on_stop = "keep-kernels") and a print
            # loop running across it: the connections go through systemd's file-descriptor store,
            # so every number arrives once, in order, none lost; the same kernel, its variables,
            # the same wrapper afterwards.
            numbers, replies = [], []
            loop_id = kc.execute("import time\nfor i in range(200):\n    print(i, flush=True)\n"
                                 "    time.sleep(0.02)\n")

            collector = threading.Thread(target=kbtest.collect_printed_numbers,
                                         args=(kc, loop_id, numbers), daemon=True)
            collector.start()
            time.sleep(1.5)
            t1 = time.time()
            subprocess.run(["systemctl", "restart", "kernel-bridge"], check=True)
            fs.wait_api(ok=(200,))
            kid = out["kernel"]["id"] if out["kernel"] else None
            fs.wait_kernel(lambda k: k["id"] == kid and k["state"] == "ready", timeout=60,
                           what="the kernel re-attached after systemctl restart")
            out["reattach_s"] = round(time.time() - t1, 2)
            collector.join(timeout=70)
            try:
                while True:
                    m = kc.get_shell_msg(timeout=2)
                    if m["parent_header"].get("msg_id") == loop_id:
                        replies.append(m["content"]["status"])
            except Exception:  # noqa: BLE001 (queue.Empty: no more replies)
                pass
            out["loop_numbers"] = len(numbers)
            out["loop_in_order"] = numbers == sorted(set(numbers))
            out["loop_lost"] = sorted(set(range(200)) - set(numbers))
            out["loop_replies"] = replies
            out["wrapper_alive"] = km.is_alive()
            kc.stop_channels()
            kc = ready_client(km, timeout=60)
            reply, stream, _ = kbtest.run_cell(kc, "print(x)")
            out["after_restart"] = stream
            out["kernels_after"] = [k["id"] for k in fs.live_kernels()]
            fs.push_token("root")  # the hub pushes it again: the restarted daemon had none
            kc.stop_channels()
        finally:
            km.shutdown_kernel()
        try:
            fs.wait_nothing_running(timeout=60)  # no live kernel, no active job
            out["left_running"] = None
        except AssertionError as e:
            out["left_running"] = str(e)
        out["jobs"] = [(j["id"], j["status"]) for j in fs.unicore_jobs()]
        with open(os.path.join(fs.dir, "wrapper.log"), errors="replace") as f:
            out["wrapper_log"] = f.read()[-3000:]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
