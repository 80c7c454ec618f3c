"""P2: ``rdzvctl --help`` and ``rdzvctl --version`` start-up vs ``python -c "import click"``."""

from __future__ import annotations

import sys
from typing import List

from bench.context import Context, cpu_ratio, ms
from bench.measure import Row, rdzvctl_argv, time_interleaved

ID = "P2"
LIMIT = 1.2


def run(ctx: Context) -> List[Row]:
    ctx.log("P2 start-up")
    s = ctx.settings
    commands = {
        "help": rdzvctl_argv() + ["--help"],
        "version": rdzvctl_argv() + ["--version"],
        "base": [sys.executable, "-c", "import click"],
    }
    timed = time_interleaved(commands, ctx.env, s.warmup, s.repeats * 2)
    base = ms(timed["base"])
    return [
        Row(ID, "rdzvctl --help", "-", ms(timed["help"]), base, "ms", f"<= {LIMIT}x", LIMIT,
            cpu_ratio=cpu_ratio(timed["help"], timed["base"])),
        Row(ID, "rdzvctl --version", "-", ms(timed["version"]), base, "ms", f"<= {LIMIT}x", LIMIT,
            cpu_ratio=cpu_ratio(timed["version"], timed["base"])),
    ]
