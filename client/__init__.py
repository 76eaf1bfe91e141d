"""The data owner's side: the ClientApp that trains under DP-SGD."""
