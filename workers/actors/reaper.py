"""The reaper: unlinks a run's /dev/shm entries if its supervisor dies without doing so.

Started by the supervisor in a session of its own (so Ctrl-C does not reach
it), it blocks on a pipe whose write end only the supervisor holds.  End of
file means the supervisor is gone, cleanly or by SIGKILL; after a short grace
for the actors to die with their parent, it unlinks every entry named after
the run.  After a clean close there is nothing left for it to do: the supervisor says so (CLEAN on
the pipe before its end), and the reaper exits at once, without the grace.
"""
from __future__ import annotations

import argparse
import os
import signal
import time

from workers.actors import REAPER_CLEAN as CLEAN


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--fd", type=int, required=True)
    a = p.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    said = b""
    while True:
        try:
            data = os.read(a.fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        said = (said + data)[-len(CLEAN):]
    if said != CLEAN:
        time.sleep(0.2)
    for name in os.listdir("/dev/shm"):
        if name.startswith(a.run + "."):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


if __name__ == "__main__":
    main()
