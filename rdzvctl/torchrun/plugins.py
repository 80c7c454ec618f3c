"""Entry points of the ``torchrun.handlers`` group (filled in with the Redis and etcd-v3 handlers)."""
