"""PyTorch baseline for `cargo xtask bench kernels`: the forward and backward
time of each convolution, max pooling and batch norm of LeNet and the small
ResNet (torch.nn.functional + autograd), on as many threads as Bonfire's run
used. One JSON line per operation, as `bonfire-bench kernels` prints;
backward is that of `y.sum()` less that of the sum itself. A model's first
convolution reads the images, so its input gradient is not computed, as in
training (the last field of each operation).

usage: python torch_kernels.py [--batch 50] [--reps 20] [--threads 1]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

OPS = [
    ("lenet conv1 1->6 5x5", "conv", (1, 28, 28), 6, 5, 1, 2, False),
    ("lenet pool 6x28x28", "pool", (6, 28, 28), 6, 2, 2, 0, True),
    ("lenet conv2 6->16 5x5", "conv", (6, 14, 14), 16, 5, 1, 0, True),
    ("lenet pool 16x10x10", "pool", (16, 10, 10), 16, 2, 2, 0, True),
    ("resnet stem 1->16 3x3", "conv", (1, 28, 28), 16, 3, 1, 1, False),
    ("resnet conv 16->16 3x3", "conv", (16, 28, 28), 16, 3, 1, 1, True),
    ("resnet conv 16->32 3x3 s2", "conv", (16, 28, 28), 32, 3, 2, 1, True),
    ("resnet conv 16->32 1x1 s2", "conv", (16, 28, 28), 32, 1, 2, 0, True),
    ("resnet conv 32->32 3x3", "conv", (32, 14, 14), 32, 3, 1, 1, True),
    ("resnet conv 32->64 3x3 s2", "conv", (32, 14, 14), 64, 3, 2, 1, True),
    ("resnet conv 64->64 3x3", "conv", (64, 7, 7), 64, 3, 1, 1, True),
    ("resnet bn 16x28x28", "bn", (16, 28, 28), 16, 0, 0, 0, True),
    ("resnet bn 32x14x14", "bn", (32, 14, 14), 32, 0, 0, 0, True),
    ("resnet bn 64x7x7", "bn", (64, 7, 7), 64, 0, 0, 0, True),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, kind, (c, h, w), out, k, s, pad, input_grad in OPS:
        x = torch.randn(args.batch, c, h, w, requires_grad=input_grad)
        weight = (torch.randn(out, c, max(k, 1), max(k, 1)) * 0.1).requires_grad_()
        bn = torch.nn.BatchNorm2d(c)

        def forward():
            if kind == "conv":
                return F.conv2d(x, weight, None, stride=s, padding=pad)
            if kind == "pool":
                return F.max_pool2d(x, k, s, pad)
            return bn(x)

        def timed(backward):
            def once():
                y = forward()
                if backward:
                    y.sum().backward()
            for _ in range(3):
                once()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                once()
            return (time.perf_counter() - t0) * 1e3 / args.reps

        forward_ms = timed(False)
        total_ms = timed(True)
        # What the loss adds to backward, timed alone on a leaf of the output's shape.
        out = forward().detach()

        def loss_only():
            leaf = out.clone().requires_grad_()
            leaf.sum().backward()

        for _ in range(3):
            loss_only()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            loss_only()
        loss_ms = (time.perf_counter() - t0) * 1e3 / args.reps
        print(json.dumps({"op": name, "impl": "torch", "batch": args.batch, "threads": args.threads,
                          "forward_ms": forward_ms, "backward_ms": max(total_ms - forward_ms - loss_ms, 0.0)}), flush=True)


if __name__ == "__main__":
    main()
