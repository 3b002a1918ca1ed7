"""PyTorch peer, run in its own virtual environment (bench/peers.py makes it): the cnn preset's model
(Conv2d 32 3x3, max-pool 2x2, ReLU, Linear 128, Linear 10: 693,962 parameters) or the lenet_bn recipe, on the
project's verified MNIST IDX files, written as PyTorch's CPU performance guidance has it: the split in memory
as one tensor, intra-op threads = cores, channels-last tensors, the fused Adam kernel; `--compile` adds
torch.compile. Prints one JSON line per result.

Usage: python -m bench.references.torch_cnn throughput DATA_DIR BATCH WARMUP TIMED [--compile] [--plain]
       python -m bench.references.torch_cnn accuracy DATA_DIR SEED
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

from bench.references import lenet_bn_recipe, report_evaluation
from trainer.datasets import idx_dir, read_idx_split, verify


class ChannelBias(nn.Module):
    """A learned offset per channel (NCHW): a conv's bias, added after its max-pool as the trainer's models do."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(initial.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x plus its channel's offset."""
        return x + self.bias.view(1, -1, 1, 1)


def _conv_pool_relu(channels_in: int, channels: int, size: int) -> list[nn.Module]:
    # Pool before the bias and ReLU, as the trainer has it: the same function, and here too less work
    # (cnn: ~4.0 -> ~3.7 ms per step on an Intel Xeon). The bias starts as nn.Conv2d initialised it.
    conv = nn.Conv2d(channels_in, channels, size)
    bias = ChannelBias(conv.bias)
    conv.bias = None
    return [conv, nn.MaxPool2d(2), bias, nn.ReLU()]


def cnn() -> nn.Module:
    """The cnn preset's architecture (pool before bias and ReLU, as the trainer has it: the same function)."""
    return nn.Sequential(*_conv_pool_relu(1, 32, 3), nn.Flatten(),
                         nn.Linear(32 * 13 * 13, 128), nn.ReLU(), nn.Linear(128, 10))


def lenet_bn() -> nn.Module:
    """The lenet_bn preset's architecture: 80,298 parameters."""
    return nn.Sequential(*_conv_pool_relu(1, 16, 5),
                         nn.Conv2d(16, 32, 5, bias=False), nn.BatchNorm2d(32, eps=1e-3, momentum=0.01),
                         nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def load(data_dir: str, split: str, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A verified split as float images in [0, 1], NCHW (channels-last in memory if asked), and int64 labels."""
    images, labels = read_idx_split(idx_dir(data_dir, "mnist"), split)
    verify("mnist", split, images, labels)
    x = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()).float().div_(255)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels.astype(np.int64))


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, compiled: bool):
    """One training step: forward, cross-entropy, backward, Adam."""
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return torch.compile(step) if compiled else step


def throughput(data_dir: str, batch: int, warmup: int, timed: int, compiled: bool, plain: bool) -> dict:
    """Examples/sec of the cnn model at `batch`, timed over `timed` steps after `warmup`."""
    torch.manual_seed(0)
    x, y = load(data_dir, "train", channels_last=not plain)
    model = cnn()
    if not plain:
        model = model.to(memory_format=torch.channels_last)
    assert sum(p.numel() for p in model.parameters()) == 693_962
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=not plain)
    step = make_step(model, optimizer, compiled)
    order = torch.randperm(len(y))
    batches = len(y) // batch
    for i in range(warmup + timed):
        if i == warmup:
            start = time.perf_counter()
        index = order[(i % batches) * batch:(i % batches + 1) * batch]
        step(x[index], y[index])
    seconds = time.perf_counter() - start
    return {"examples_per_sec": timed * batch / seconds}


def accuracy(data_dir: str, seed: int) -> None:
    """The lenet_bn recipe (the trainer's preset: Adam, linear warm-up then cosine decay, its batch, 1 epoch);
    prints the test accuracy with the wall time of its evaluation."""
    torch.manual_seed(seed)
    x, y = load(data_dir, "train", channels_last=True)
    test_x, test_y = load(data_dir, "test", channels_last=True)
    model = lenet_bn().to(memory_format=torch.channels_last)
    batch, lr, steps, warmup = lenet_bn_recipe(len(y))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    step = make_step(model, optimizer, compiled=False)
    model.train()
    order = torch.randperm(len(y))
    for i in range(steps):
        index = order[i * batch:(i + 1) * batch]
        step(x[index], y[index])
        schedule.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
                      for i in range(0, len(test_y), 1000))
    report_evaluation(1, correct / len(test_y))


def main() -> None:
    """Parse the mode and run it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("throughput", "accuracy"))
    parser.add_argument("data_dir")
    parser.add_argument("numbers", type=int, nargs="+")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--plain", action="store_true", help="no channels-last, no fused Adam")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.mode == "throughput":
        print(json.dumps(throughput(args.data_dir, *args.numbers, compiled=args.compile, plain=args.plain)))
    else:
        accuracy(args.data_dir, *args.numbers)


if __name__ == "__main__":
    main()
