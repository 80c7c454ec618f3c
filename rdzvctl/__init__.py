"""rdzvctl: inspect and repair PyTorch elastic rendezvous state, without torch.

The library is usable on its own; the command line is a thin layer over it::

    from rdzvctl.backends import Address, open_backend
    from rdzvctl.state.codec import decode

    with open_backend(Address("redis", "127.0.0.1:6379", "job42")) as backend:
        raw, token = backend.get_state()
        state = decode(raw)

Importing rdzvctl never imports torch or any backend client library.
"""

__version__ = "0.1.0"
