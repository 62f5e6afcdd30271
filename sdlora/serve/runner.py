"""The small parent of every `sdlora` process the web app starts: output to a log, signals passed on, the exit
code written to a file, so that a restarted server still learns how a run ended.

    python -m sdlora.serve.runner LOG RC_FILE -- python -m sdlora train ...

Standard library only, and started in a new session, so neither closing the browser nor stopping the server
stops it. Stop sends SIGTERM to this process; it passes it to the command (train then checkpoints, exits 143).
The command's pid and start time go to RC_FILE's sibling ID.pid at once, so the app still knows (and can stop) the
command if this process dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m sdlora.serve.runner LOG RC_FILE -- COMMAND...", file=sys.stderr)
        return 2
    log, rc_file, command = Path(argv[0]), Path(argv[1]), argv[3:]
    with log.open("ab") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _write(rc_file.with_name(rc_file.stem + ".pid"), json.dumps({"pid": child.pid, "started_at": time.time()}))

        def forward(signum: int, frame: object) -> None:
            child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    _write(rc_file, f"{code}\n")
    return code


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
