"""Simulated federations: scenario data, the engine runner and run reports."""
