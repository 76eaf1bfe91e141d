"""Privacy accounting for DP-SGD clients."""
