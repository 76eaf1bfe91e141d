"""The `fedmodel` command line: one module per command group.

The only part of the core that imports the roles (server/, client/) and the harness.
"""
