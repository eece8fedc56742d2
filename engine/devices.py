"""Where the engine computes."""

import torch


def best_device(device=None) -> torch.device:
    """`device` where one is given, else CUDA where there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
