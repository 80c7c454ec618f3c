"""Client TLS options shared by the backends: the file checks and the ``ssl.SSLContext``.

:func:`check_tls_files` refuses a TLS option that names a missing file, and
a key without its certificate, with the option's name in the message;
:func:`client_context` builds the context both etcd backends use (the Redis
backend hands the same files to redis-py, after loading them once here so a
bad file is a config error before any server is contacted).  A callable
password means an encrypted key fails instead of prompting on the terminal.
"""

from __future__ import annotations

import os
import ssl
from typing import Mapping, Optional

from rdzvctl.errors import BackendConfigError

__all__ = ["check_tls_files", "client_context"]


def check_tls_files(files: Mapping[str, Optional[str]], cert: str, key: str) -> None:
    """Every named file exists, and the key option ``key`` comes with the certificate option ``cert``."""
    for option, path in files.items():
        if path and not os.path.isfile(path):
            raise BackendConfigError(f"--rdzv-conf {option}: no such file: {path}")
    if files.get(key) and not files.get(cert):
        raise BackendConfigError(f"--rdzv-conf {key} needs {cert}")


def client_context(
    ca_file: Optional[str] = None,
    cert_file: Optional[str] = None,
    key_file: Optional[str] = None,
    key_password: str = "",
) -> ssl.SSLContext:
    """A verifying client context; raises ``ssl.SSLError``/``OSError``/``ValueError`` on a bad file."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None, password=lambda: key_password)
    return context
