"""Small models shared by the library tests."""
import torch
import torch.nn as nn


def small_mlp(seed=0, sizes=(12, 10, 8, 6)):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()
