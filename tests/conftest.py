"""Shared pytest setup. Server fixtures live in tests/support/<server>.py and are
imported by the test modules that need them."""

import os

# Rendered output must not depend on the developer's terminal.
os.environ.setdefault("COLUMNS", "120")
