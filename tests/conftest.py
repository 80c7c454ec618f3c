"""Shared pytest setup: the one list of fixture plugins every test module sees.

Server fixtures live in ``tests/support/<server>.py`` (redis, etcd, torch
TCPStore/FileStore peers, torchrun jobs) and the CLI fixtures in
``tests/support/cli.py``; they are registered here once, so a test module
names a fixture as an argument and imports only the helpers it calls.
The reliability suite adds its own in ``tests/reliability/conftest.py``.
"""

import os

# Rendered output must not depend on the developer's terminal.
os.environ.setdefault("COLUMNS", "120")

pytest_plugins = [
    "tests.support.cli",
    "tests.support.etcd_server",
    "tests.support.redis_server",
    "tests.support.torch_peer",
    "tests.support.torch_handlers",
    "tests.support.torchrun_jobs",
]
