"""Runtime plumbing shared by every role: processes, the Flower app definition, `flwr run`."""
