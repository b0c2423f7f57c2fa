#!/bin/sh
# A stand-in "kernel" for the throughput benchmark: an iperf3 server on the shell port of the
# connection file the agent wrote (127.0.0.1 only); it serves tests until the agent stops it.
port=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["shell_port"])' "$1")
exec iperf3 -s -B 127.0.0.1 -p "$port"
