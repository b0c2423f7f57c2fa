#!/usr/bin/python3
"""Golden vectors for tests/gateway/ (golden_test.cpp), made by the real implementations: Debian's
jupyter_server 1.23 (base/zmqhandlers.py: the legacy binary layout, the v1 layout, and
ZMQStreamHandler._reserialize_reply, which turns a kernel's ZeroMQ parts into the frame a client
gets), jupyter_client 7.4 (Session: signing) and the gateway relay of jupyter_server 1.23
(GatewayWebSocketClient.on_message over a real tornado WebSocket, captured off the socket: the
binary layout in a TEXT frame, reference quirk H2) and its kernelspec URLs with KERNEL_USERNAME
set (GatewayKernelSpecManager, reference 1b).

Usage: /usr/bin/python3 tests/gateway/make_golden.py [--check]
  without --check: writes tests/gateway/golden.json
  --check: regenerates and compares with the committed file (ctest gateway_golden_vectors);
           exit 77 (skipped) if jupyter_server is not installed."""
import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
import sys
import threading

try:
    from jupyter_client.session import Session
    from jupyter_server.base.zmqhandlers import (ZMQStreamHandler, deserialize_binary_message,
                                                 deserialize_msg_from_ws_v1,
                                                 serialize_binary_message,
                                                 serialize_msg_to_ws_v1)
    from jupyter_server.gateway.handlers import GatewayWebSocketClient
    from jupyter_server.gateway.managers import GatewayKernelSpecManager
    from tornado.websocket import websocket_connect
except ImportError as e:
    print(f"make_golden: jupyter_server is not installed ({e}); apt-get install python3-jupyter-server")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden.json")
KEY = b"5f2e6c1a-golden-key"
DATE = "2024-01-02T03:04:05.123456Z"


def header(msg_type, msg_id):
    return {"msg_id": msg_id, "msg_type": msg_type, "session": "sess-1", "username": "alice",
            "date": DATE, "version": "5.3"}


def hexes(parts):
    return [p.hex() for p in parts]


class Relay:
    """A jupyter_server ZMQStreamHandler as far as _reserialize_reply needs one."""

    def __init__(self):
        self.session = Session(key=KEY, signature_scheme="hmac-sha256")


def capture_gateway_frame(payload):
    """What GatewayWebSocketClient.on_message puts on the wire: (opcode, unmasked payload)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    seen = {}

    def serve():
        conn, _ = server.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = [line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        data = b""

        def need(n):
            nonlocal data
            while len(data) < n:
                data += conn.recv(65536)

        need(2)
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if length == 126:
            need(4)
            length, at = struct.unpack(">H", data[2:4])[0], 4
        elif length == 127:
            need(10)
            length, at = struct.unpack(">Q", data[2:10])[0], 10
        need(at + 4 + length)
        mask = data[at:at + 4]
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(data[at + 4:at + 4 + length]))
        seen.update(fin=bool(data[0] & 0x80), opcode=opcode, payload=body)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()

    async def send():
        client = GatewayWebSocketClient()
        client.ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/k/channels")
        client.on_message(payload)  # what jupyter_server does with a browser's binary frame
        await asyncio.sleep(0.2)
        client.ws.close()

    asyncio.run(send())
    thread.join(10)
    server.close()
    return seen


def vectors():
    out = {"key": KEY.decode()}
    session = Session(key=KEY, signature_scheme="hmac-sha256")

    # A kernel's reply as ZeroMQ parts, signed by jupyter_client, with a routing identity and
    # two buffers (one empty), non-ASCII content.
    reply = {"header": header("comm_msg", "m-2"), "parent_header": header("comm_msg", "m-1"),
             "metadata": {"k": [1, 2]}, "content": {"data": {"text": "h\u00e9llo \u2713"}, "n": 1.5}}
    buffers = [bytes(range(256)), b"", b"\x00\xff tail"]
    signed = session.serialize(dict(reply), ident=[b"routing-id"]) + buffers
    out["signed_parts"] = hexes(signed)
    plain = session.serialize({**reply, "header": header("execute_reply", "m-3")}, ident=[])
    out["signed_parts_no_buffers"] = hexes(plain)

    # jupyter_server's outbound frames for those parts (legacy protocol): binary with buffers,
    # JSON text without.
    with_buffers = ZMQStreamHandler._reserialize_reply(Relay(), signed, channel="iopub")
    assert isinstance(with_buffers, bytes)
    out["legacy_out_binary"] = with_buffers.hex()
    text = ZMQStreamHandler._reserialize_reply(Relay(), plain, channel="shell")
    assert isinstance(text, str)
    out["legacy_out_text"] = text

    # v1 outbound: the parts after the signature, relayed raw (ZMQChannelsHandler._on_zmq_reply).
    idents, rest = session.feed_identities(signed)
    out["v1_out"] = serialize_msg_to_ws_v1(rest[1:], "iopub").hex()
    channel, parts = deserialize_msg_from_ws_v1(bytes.fromhex(out["v1_out"]))
    assert channel == "iopub" and parts == rest[1:]

    # A browser's message with buffers (an ipywidgets binary comm_msg), legacy binary layout.
    request = {"header": header("comm_msg", "c-1"), "parent_header": {}, "metadata": {},
               "content": {"comm_id": "w-1", "data": {"method": "custom"}}, "channel": "shell",
               "buffers": [b"\x00\x01\x02\x03binary", b"\xfe\xff"]}
    layout = serialize_binary_message(request)
    back = deserialize_binary_message(layout)
    assert back["buffers"] == request["buffers"] and back["content"] == request["content"]
    out["legacy_in_binary"] = layout.hex()
    out["legacy_in_binary_buffers"] = hexes(request["buffers"])
    out["legacy_in_json"] = {k: v for k, v in request.items() if k != "buffers"}

    # The same message relayed by jupyter_server 1.23's gateway client: a TEXT frame (H2).
    frame = capture_gateway_frame(layout)
    assert frame["fin"] and frame["payload"] == layout, "the relay changed the bytes"
    out["h2_frame_opcode"] = frame["opcode"]
    out["h2_frame_payload"] = frame["payload"].hex()

    # v1 inbound, as a client that offered v1 sends it (raw JSON parts).
    raw = [json.dumps(request[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
    out["v1_in"] = serialize_msg_to_ws_v1(raw + request["buffers"], "shell").hex()
    out["v1_in_parts"] = hexes(raw + request["buffers"])

    # The URL jupyter_server's GatewayKernelSpecManager asks for one kernelspec when KERNEL_USERNAME
    # is set (reference 1b): the name lands after the query.
    os.environ["KERNEL_USERNAME"] = "alice"
    base = GatewayKernelSpecManager._get_endpoint_for_user_filter("http://bridge:8889/api/kernelspecs")
    manager = object.__new__(GatewayKernelSpecManager)  # only base_endpoint is used
    manager.__dict__["base_endpoint"] = base
    out["kernelspec_url_list"] = GatewayKernelSpecManager._get_kernelspecs_endpoint_url(manager)
    out["kernelspec_url_one"] = GatewayKernelSpecManager._get_kernelspecs_endpoint_url(
        manager, kernel_name="my.spec-1")
    return out


def main():
    fresh = vectors()
    text = json.dumps(fresh, indent=1, sort_keys=True) + "\n"
    if "--check" not in sys.argv:
        with open(GOLDEN, "w") as f:
            f.write(text)
        print(f"make_golden: wrote {GOLDEN}")
        return 0
    with open(GOLDEN) as f:
        committed = json.load(f)
    differ = sorted(k for k in set(fresh) | set(committed) if fresh.get(k) != committed.get(k))
    if differ:
        print("make_golden: jupyter_server now produces other bytes for: " + ", ".join(differ))
        return 1
    print(f"make_golden: {len(fresh)} vectors match jupyter_server's output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
