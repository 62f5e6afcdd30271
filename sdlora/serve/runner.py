"""The small parent of every `sdlora` process the web app starts: output to a log, signals passed on, the exit
code written to a file, so that a restarted server still learns how a run ended.

    python -m sdlora.serve.runner LOG RC_FILE -- python -m sdlora train ...

Standard library only, and started in a new session, so neither closing the browser nor stopping the server
stops it. Stop sends SIGTERM to this process; it passes it to the command (train then checkpoints, exits 143).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m sdlora.serve.runner LOG RC_FILE -- COMMAND...", file=sys.stderr)
        return 2
    log, rc_file, command = Path(argv[0]), Path(argv[1]), argv[3:]
    with log.open("ab") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def forward(signum: int, frame: object) -> None:
            child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    tmp = rc_file.with_name(rc_file.name + ".tmp")
    tmp.write_text(f"{code}\n", encoding="utf-8")
    os.replace(tmp, rc_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
