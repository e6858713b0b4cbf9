"""The fork server both fault injectors run as, so each trial skips the seconds of importing torch.

Per line on stdin (a JSON job with at least "log"), it forks a child that runs `child(job)`
with stdout to LOG.out and stderr to LOG.err, prints `pid N`, waits, and prints `exit CODE`
(-9 when killed; 1 for an exception, whose traceback goes to LOG.err).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable


def serve(child: Callable[[dict], int]) -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            for fd, suffix in ((1, ".out"), (2, ".err")):
                os.dup2(os.open(job["log"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            code = 1
            try:
                code = child(job)
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
