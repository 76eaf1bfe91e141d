"""Stock Flower baseline: plain FedAvg with client-side Opacus DP-SGD."""
