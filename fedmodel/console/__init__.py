"""The operator's and auditor's console: runs, privacy budgets and the federation in a browser.

A second face beside the command line (`fedmodel console PATH` starts it): like the CLI
it may read what the roles and the harness write, and nothing imports it but the CLI.
"""
