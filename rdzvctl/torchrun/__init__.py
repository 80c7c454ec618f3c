"""torchrun rendezvous handlers over rdzvctl's Redis and etcd-v3 backends.

``plugins`` holds the ``torchrun.handlers`` entry points (cheap to import);
``stores`` the torch ``Store`` classes on the same servers and ``backend`` the
adapter to torch's ``RendezvousBackend``: both import torch, and are loaded
only when torchrun builds a handler.  The rdzvctl CLI never imports this package.
"""
