"""End-to-end helpers: rdzvctl as a subprocess and torch rendezvous nodes (rdzv_node.py)."""
