#!/usr/bin/python3
"""Regenerates the committed seed corpora in tests/fuzz/corpus/: valid and near-valid link frames,
the control API's request bodies (api_forms_fuzz), bridge configurations (config_fuzz) and UNICORE
replies (unicore_replies_fuzz); the control API's whole requests (control_api_fuzz) are written by
hand.
Frame layout: docs/protocol.md. Run from anywhere: /usr/bin/python3 tests/fuzz/make_corpus.py"""
import json
import os
import struct

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
HELLO, CHAL, RESP, RESUME, ACK, PING, PONG, BYE = 1, 2, 3, 4, 5, 6, 7, 8
OPEN, DATA, CREDIT, FIN, RESET, CONTROL = 16, 17, 18, 19, 20, 21


def fr(t, stream=0, seq=0, payload=b""):
    return struct.pack(">BBHIIQ", t, 0, 0, stream, len(payload), seq) + payload


def write(target, name, data):
    os.makedirs(os.path.join(BASE, target), exist_ok=True)
    with open(os.path.join(BASE, target, name), "wb") as f:
        f.write(data)


hello = struct.pack(">HBBI", 1, 0, 0, 65536) + b"\x01" * 16 + b"\x00" * 16 + b"\x11" * 32
chal = struct.pack(">HBBI", 1, 1, 0, 65536) + b"\x02" * 16 + b"\x00" * 16 + b"\x22" * 32 + b"\x33" * 32
allk = (fr(HELLO, payload=hello) + fr(CHAL, payload=chal) + fr(RESP, payload=b"\x44" * 32)
        + fr(RESUME, payload=struct.pack(">Q", 3)) + fr(ACK, payload=struct.pack(">Q", 1))
        + fr(PING, payload=struct.pack(">Q", 9)) + fr(PONG, payload=struct.pack(">Q", 9))
        + fr(OPEN, 1, 1, b"\x04") + fr(DATA, 1, 2, b"ping") + fr(CREDIT, 1, 3, struct.pack(">I", 4096))
        + fr(FIN, 1, 4) + fr(RESET, 1, 5, b"kernel gone")
        + fr(CONTROL, 0, 6, json.dumps({"type": "interrupt"}).encode()) + fr(BYE, payload=b"bye"))
# frame_decoder_fuzz: the first byte chooses the read size.
write("frame_decoder_fuzz", "all_kinds_step1", b"\x00" + allk)
write("frame_decoder_fuzz", "all_kinds_step13", b"\x0c" + allk)
write("frame_decoder_fuzz", "big_data", b"\x60" + fr(DATA, 3, 1, bytes(range(256)) * 64))
write("frame_decoder_fuzz", "oversized", b"\x01" + struct.pack(">BBHIIQ", CONTROL, 0, 0, 0, 0x7FFFFFFF, 1))
# link_handshake_fuzz: fed to both roles.
write("link_handshake_fuzz", "hello_response", fr(HELLO, payload=hello) + fr(RESP, payload=b"\x55" * 32))
write("link_handshake_fuzz", "challenge", fr(CHAL, payload=chal))
write("link_handshake_fuzz", "goodbye", fr(BYE, payload=b"link refused: authentication failed"))
write("link_handshake_fuzz", "bad_version", fr(HELLO, payload=struct.pack(">HBBI", 2, 0, 0, 65536) + hello[8:]))
# link_session_fuzz: what an authenticated bridge sends after RESUME (sequence numbers from 1).
write("link_session_fuzz", "streams",
      fr(OPEN, 1, 1, b"\x00") + fr(DATA, 1, 2, b"x" * 100) + fr(CONTROL, 0, 3, b'{"type":"interrupt"}')
      + fr(FIN, 1, 4) + fr(OPEN, 2, 5, b"\x04") + fr(DATA, 2, 6, b"y" * 10) + fr(RESET, 2, 7, b"bye")
      + fr(PING, payload=struct.pack(">Q", 1)) + fr(OPEN, 3, 8, b"\x01")
      + fr(CREDIT, 3, 9, struct.pack(">I", 10)) + fr(ACK, payload=struct.pack(">Q", 0)))
write("link_session_fuzz", "flood", fr(OPEN, 1, 1, b"\x01") + b"".join(fr(DATA, 1, 2 + i, b"z" * 4000) for i in range(5)))
write("link_session_fuzz", "control_bad_json", fr(CONTROL, 0, 1, b"not json") + fr(CONTROL, 0, 2, b"[1]"))
write("link_session_fuzz", "goodbye", fr(BYE, payload=b"bridge shutting down"))

# config_fuzz: TOML as an operator writes it (the sample in etc/ is a seed too), and near misses.
SITE = '''[[site]]
name = "demo"
unicore_url = "https://unicore.example.org:8080/DEMO-SITE/rest/core"
login_hosts = ["login1.example.org:22", "login2.example.org"]
known_hosts = "known_hosts"
ssh_user = "kbridge"
ssh_identity = "id_ed25519"
agent = { mode = "installed", path = "/opt/kernel-bridge/bin/kernel-bridge" }
kernels = { python3 = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"] }
default_kernel = "python3"
'''
MINIMAL = '[bridge]\nstate_dir = "/var/lib/kernel-bridge"\n[api]\nunix_socket = "api.sock"\n' + SITE
with open(os.path.join(os.path.dirname(BASE), "..", "..", "etc", "kernel-bridge.toml"), "rb") as f:
    write("config_fuzz", "etc_sample", f.read())
write("config_fuzz", "minimal", MINIMAL.encode())
write("config_fuzz", "tcp_two_sites", ('''[bridge]
state_dir = "state"
log_level = "debug"
restart_grace = "2m30s"
ended_retention = "1d12h"
max_kernels_per_user = 0
[api]
tcp = "[::1]:8765"
tokens_file = "api-tokens"
admin_users = []
max_body = "64KiB"
header_timeout = "5s"
read_timeout = "30s"
idle_timeout = "2m"
max_wait = "1min"
max_connections = 16
max_connections_per_user = 1
''' + SITE + '''
[[site]]
name = "gpu.site-2"
description = ""
unicore_url = "http://[fd00::1]:8080/G/rest/core///"
verify_tls = false
login_hosts = ["[fd00::2]:2222", "10.0.0.1"]
known_hosts = "/k"
ssh_user = "kb"
ssh_identity = "/id"
ssh_cipher = "aes128-gcm@openssh.com"
ssh_keepalive = "0s"
connect_timeout = "1h"
agent = { mode = "upload" }
gpu_mode = "batch_lines"
job_template = """
module load CUDA ${VERSION} {kernel_argv}
exec {agent}
"""
environment = { OMP_NUM_THREADS = "1", _X2 = "" }
job_tags = []
kernels = { r = ["R", "--connection={connection_file}"] }
[site.defaults]
queue = "gpus"
nodes = 2
gpus = 4
runtime = "2h30m"
project = "training2401"
reservation = "r1"
qos = "normal"
memory = "16G"
[site.limits]
queues = ["gpus"]
max_nodes = 4
max_gpus = 4
max_runtime = "24h"
max_memory = "1T"
''').encode())
write("config_fuzz", "unknown_key", MINIMAL.replace("ssh_user", "ssh_usr").encode())
write("config_fuzz", "defaults_outside_limits",
      (MINIMAL + '[site.defaults]\nruntime = "48h"\n[site.limits]\nmax_runtime = "1d"\n').encode())
write("config_fuzz", "bad_toml", b'[bridge\nstate_dir = "/x"\n[[site]]\nname = 1e999\n')

# unicore_replies_fuzz: the first byte is the selector (bits 0-2: 7 = a bare NodeList; bits 3-5: the
# HTTP status 200 201 401 403 404 500 502 503; bits 6-7: content type json, none, html, problem+json).
def reply(name, body, status=0, ctype=0):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    write("unicore_replies_fuzz", name, bytes([(status << 3) | (ctype << 6)]) + data)


links = lambda **k: {"_links": {n: {"href": h} for n, h in k.items()}}
BASE_URL = "https://unicore.example:8080/DEMO-SITE/rest/core"
reply("core_info", {
    "client": {"dn": "CN=demouser,O=Test", "xlogin": {"UID": "demouser", "availableUIDs": ["demouser"],
               "group": "users", "availableGroups": ["users", "proj1"]},
               "role": {"selected": "user", "availableRoles": ["user"]},
               "queues": {"selected": "batch", "availableQueues": ["batch", "gpus"]},
               "authenticationMethod": "PASSWORD_FILE"},
    "server": {"version": "10.1.0", "siteName": "DEMO-SITE",
               "jobSubmission": {"enabled": "false", "message": "maintenance"}},
    **links(jobs=BASE_URL + "/jobs", storages=BASE_URL + "/storages")})
reply("job", {"status": "FAILED", "statusMessage": "Job aborted.", "exitCode": "137", "queue": "batch",
              "batchSystemID": "8017847", "name": "k", "tags": ["jupyter", "kernel-bridge"],
              "submissionTime": "2024-05-02T10:11:12+0200", "terminationTime": None,
              **links(workingDirectory=BASE_URL + "/storages/j-1-uspace",
                      details=BASE_URL + "/jobs/j-1/details")}, status=1)
reply("job_details", {"JobId": "8017847", "JobState": "RUNNING", "NodeList": "jrc[0025-0026,0030]",
                      "BatchHost": "jrc0025", "NumNodes": 3, "Exclusive": False, "Priority": 1.5})
reply("job_details_pending", {"rawDetailsData": "N/A"})
reply("file_info", {"path": "/", "isDirectory": True, "size": "4096", "owner": "alice",
                    "permissions": "rwx------", "lastAccessed": "2024-05-02T10:11:12+0200",
                    "content": {"/stdout": {"isDirectory": "false", "size": 12},
                                "/kernel-bridge-agent.json": {"isDirectory": False, "size": 90}}})
reply("job_list", {"jobs": [BASE_URL + "/jobs/j-1", BASE_URL + "/jobs/j-2"],
                   **links(next=BASE_URL + "/jobs?offset=2&num=2")})
reply("error_401", {"errorMessage": "Access denied: the token has expired", "status": 401},
      status=2)
reply("html_502", b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
      status=6, ctype=2)
reply("deep", b"[" * 70 + b"]" * 70)
write("unicore_replies_fuzz", "hostlist", b"\x07n[1-3]-ib,a[1-2]b[003-004],jrc[0025-0026,0030],c1")

# api_forms_fuzz: request bodies as the hub and the kernel wrapper send them, and expires_at values.
def body(name, value):
    write("api_forms_fuzz", name, value if isinstance(value, bytes) else json.dumps(value).encode())


CONNECTION = {"ip": "127.0.0.1", "transport": "tcp", "shell_port": 40000, "iopub_port": 40001,
              "stdin_port": 40002, "control_port": 40003, "hb_port": 40004, "key": "a0b1c2",
              "signature_scheme": "hmac-sha256", "kernel_name": "python3"}
body("create_kernel", {"site": "demo", "kernel": "python3", "name": "analysis", "lease": 300,
                       "tags": {"course": "hpc101"},
                       "resources": {"queue": "gpus", "nodes": 1, "gpus": 1, "runtime": "2h30m",
                                     "project": "proj1", "reservation": "course", "qos": "normal",
                                     "memory": "32G"},
                       "connection": CONNECTION})
body("resources_numbers", {"resources": {"nodes": 4, "gpus": 0, "runtime": 7200, "memory": 1000},
                           "connection": dict(CONNECTION, ip="::1", hb_port=40000)})
body("credentials", {"token": "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "expires_at": "2030-11-26T18:00:00Z"})
body("credentials_unix", {"token": "abc.def", "expires_at": 1924992000.5})
body("credentials_offset", {"token": "abc.def", "expires_at": "2030-02-28T23:59:60.123456+05:30"})
body("expires_at", b"2031-12-31T23:59:59.999z")

# gateway_codec_fuzz: the first byte is the mode (0 legacy text, 1 legacy binary, 2 v1, 3 ZeroMQ
# parts separated by FF FE, 4 a POST /api/kernels body, 5 a kernelspecs path?query). Layouts:
# docs/gateway.md.
GW_HEADER = {"msg_id": "m-1", "msg_type": "comm_msg", "session": "s-1", "username": "alice",
             "date": "2024-01-02T03:04:05.123456Z", "version": "5.3"}
GW_MSG = {"header": GW_HEADER, "parent_header": {}, "metadata": {},
          "content": {"comm_id": "w-1", "data": {"method": "custom", "x": [1, 2.5, None]}}}


def gw_legacy(msg, buffers):
    parts = [json.dumps(msg).encode()] + buffers
    offsets = [4 * (len(parts) + 1)]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + len(p))
    return struct.pack(">%dI" % (len(parts) + 1), len(parts), *offsets) + b"".join(parts)


def gw_v1(channel, parts):
    offsets = [8 * (len(parts) + 3), 8 * (len(parts) + 3) + len(channel)]
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    return struct.pack("<%dQ" % (len(offsets) + 1), len(offsets), *offsets) + channel + b"".join(parts)


GW_RAW = [json.dumps(GW_MSG[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
write("gateway_codec_fuzz", "legacy_text", b"\x00" + json.dumps(dict(GW_MSG, channel="shell", buffers=[])).encode())
write("gateway_codec_fuzz", "legacy_text_stdin", b"\x00" + json.dumps(dict(GW_MSG, channel="stdin")).encode())
write("gateway_codec_fuzz", "legacy_binary", b"\x01" + gw_legacy(dict(GW_MSG, channel="shell"), [b"\x00\x01\xff", b""]))
write("gateway_codec_fuzz", "legacy_h2_text", b"\x00" + gw_legacy(dict(GW_MSG, channel="control"), [b"buf"]))
write("gateway_codec_fuzz", "v1", b"\x02" + gw_v1(b"shell", GW_RAW + [b"\x10\x20"]))
write("gateway_codec_fuzz", "v1_bad_offsets", b"\x02" + struct.pack("<3Q", 2, 24, 99))
write("gateway_codec_fuzz", "multipart", b"\x03" + b"\xff\xfe".join([b"routing-id", b"<IDS|MSG>", b""] + GW_RAW + [b"buffer"]))
write("gateway_codec_fuzz", "multipart_signed", b"\x03" + b"\xff\xfe".join(
    [b"<IDS|MSG>", b"0" * 64] + GW_RAW))
write("gateway_codec_fuzz", "start_request", b"\x04" + json.dumps({"name": "juwels-gpu", "env": {
    "KERNEL_USERNAME": "alice", "KERNEL_LAUNCH_TIMEOUT": "40", "KERNEL_NODES": "2", "KERNEL_GPUS": "4",
    "KERNEL_RUNTIME": "2h30m", "KERNEL_PROJECT": "hpc-ai", "KERNEL_PARTITION": "booster",
    "KERNEL_RESERVATION": "maint", "JUPYTERHUB_API_TOKEN": "x", "PATH": "/usr/bin"}}).encode())
write("gateway_codec_fuzz", "start_request_null", b"\x04" + b'{"name": null, "env": {}}')
write("gateway_codec_fuzz", "kernelspec_user_quirk", b"\x05/api/kernelspecs?user=alice/my.spec-1")
write("gateway_codec_fuzz", "kernelspec_one", b"\x05/api/kernelspecs/a%2Eb/")
