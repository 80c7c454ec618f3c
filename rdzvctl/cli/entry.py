"""The ``rdzvctl`` program's entry point: start-up runs without the cyclic garbage collector.

Importing click and a command's modules builds tens of thousands of objects (functions,
classes, code objects) and no garbage cycles worth collecting; each collection on the
way walks all of them again (about a twentieth of ``get``'s start-up). The collector is
paused from the first import until the command's module is loaded, then the objects
built so far are moved out of its reach (:func:`gc.freeze`, as CPython's documentation
suggests for a process that is done starting) and it runs as usual: long-lived commands
(``watch``, ``exporter``) collect what they make.  When no command loads (``--help``,
``--version``, a usage error) it resumes as :func:`main` returns.  Importing
:mod:`rdzvctl.cli.main` as a library changes nothing.
"""

from __future__ import annotations

import gc
from typing import Any, List, Optional


def main(argv: Optional[List[str]] = None) -> Any:
    """``rdzvctl``: :func:`rdzvctl.cli.main.main` with the collector paused while it starts."""
    paused = gc.isenabled()
    gc.disable()
    from rdzvctl.cli import main as cli_main

    cli_main.resume_collector_after_start = paused
    try:
        return cli_main.main(argv)
    finally:
        # No command's module was loaded (--help, --version, a usage error): resume all the
        # same, so a program calling this in-process keeps its collector (and its next call
        # pauses it again instead of finding it off and leaving it off).
        cli_main._started()
