"""torchrun rendezvous handlers over rdzvctl's backends (imports torch; never used by the CLI)."""
