"""etc/kernel-bridge.service passes `systemd-analyze verify` (unknown keys, bad values, a missing
executable are errors there) with its ExecStart pointed at the built binary, and the command line it
runs is one the binary accepts (`serve --help` with the same options exits 0).

Exit 77 (skipped) where systemd-analyze is not installed.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
import kbtest  # noqa: E402  (where the tests find the source tree and the binary)

BIN = os.path.abspath(kbtest.BIN)  # systemd wants an absolute ExecStart
UNIT = os.path.join(kbtest.SRC, "etc", "kernel-bridge.service")


def main():
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        print("SKIP: systemd-analyze is not installed")
        return 77
    text = open(UNIT).read()
    m = re.search(r"^ExecStart=(\S+)(.*)$", text, re.M)
    if not m:
        print("FAIL: no ExecStart line in", UNIT)
        return 1
    exe, args = m.group(1), m.group(2).split()
    with tempfile.TemporaryDirectory() as tmp:
        unit = os.path.join(tmp, "kernel-bridge.service")
        with open(unit, "w") as f:
            f.write(text.replace(f"ExecStart={exe}", f"ExecStart={BIN}"))
        r = subprocess.run([analyze, "verify", unit], capture_output=True, text=True)
        # Only findings about our unit count (the host's own units may have warnings).
        findings = [line for line in (r.stdout + r.stderr).splitlines()
                    if "kernel-bridge.service" in line]
        if r.returncode != 0 or findings:
            print("FAIL: systemd-analyze verify:\n" + (r.stdout + r.stderr))
            return 1
    # The daemon's command line: every option it uses exists (--help parses them all first).
    r = subprocess.run([BIN, *args, "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL: {exe} {' '.join(args)} is not a valid command line:\n{r.stdout}{r.stderr}")
        return 1
    print("OK: unit verified; ExecStart:", exe, " ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
