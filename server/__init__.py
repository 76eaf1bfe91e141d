"""The coordinator's side: the ServerApp, its strategy, checkpoints and run records."""
