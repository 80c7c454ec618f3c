"""Run the rdzvctl CLI with the write flow instrumented: a crash right after the backup, or a trace.

``python -m tests.reliability.crash_after_backup ARGS`` runs ``rdzvctl ARGS``
with ``rdzvctl.cli.change.write_backup`` and ``write_fenced`` wrapped, and
``os.fsync`` logged.  Every event is appended to ``$RDZVCTL_RELIABILITY_LOG``
(``fsync <path>``, ``backup-returned <path>``, ``backend-write``).  With
``RDZVCTL_RELIABILITY_INJECT=crash`` the process dies (``os._exit(86)``, no
cleanup, like a SIGKILL) right after the backup is written and before the
backend is touched; with ``trace`` it runs to the end.  With ``hold`` it
waits once the backup is written and reported (``change._save_backup``
returned) until the file ``$RDZVCTL_RELIABILITY_GO`` exists, logging
``held``, so a test can interrupt it between the backup and the fenced
write, or stop the server before letting the write go.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

CRASH_EXIT = 86


def main() -> None:
    import rdzvctl.cli.change as change
    from rdzvctl.cli.main import main as cli_main

    mode = os.environ.get("RDZVCTL_RELIABILITY_INJECT", "trace")
    log_path = os.environ["RDZVCTL_RELIABILITY_LOG"]

    def log(line: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(line + "\n")

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        log(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")

    write_backup, write_fenced = change.write_backup, change.write_fenced

    def backup_then_maybe_crash(*args: Any, **kwargs: Any) -> Any:
        path = write_backup(*args, **kwargs)
        log(f"backup-returned {path}")
        if mode == "crash":
            os._exit(CRASH_EXIT)
        return path

    save_backup = change._save_backup

    def save_then_hold(*args: Any, **kwargs: Any) -> Any:
        path = save_backup(*args, **kwargs)
        log("held")
        while not os.path.exists(os.environ["RDZVCTL_RELIABILITY_GO"]):
            time.sleep(0.02)
        return path

    def logged_write(*args: Any, **kwargs: Any) -> Any:
        log("backend-write")
        return write_fenced(*args, **kwargs)

    os.fsync = fsync  # type: ignore[assignment]
    change.write_backup = backup_then_maybe_crash  # type: ignore[assignment]
    change.write_fenced = logged_write  # type: ignore[assignment]
    if mode == "hold":
        change._save_backup = save_then_hold  # type: ignore[assignment]
    sys.argv[0] = "rdzvctl"
    cli_main()


if __name__ == "__main__":
    main()
