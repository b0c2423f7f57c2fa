#!/usr/bin/python3
"""Regenerates the committed seed corpus in tests/fuzz/corpus/ (valid and near-valid link frames).
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
