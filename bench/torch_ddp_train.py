"""PyTorch DDP (Gloo, CPU) baseline for `cargo xtask bench train`.

The same work as `bonfire train` under the benchmark: WORLD processes with
THREADS threads each (default 1), Fashion-MNIST scaled as (x/255 - 0.5)/0.5, SGD (lr 0.01,
momentum 0.9), the given global batch split evenly over the ranks. Five
warm-up steps, a barrier, STEPS timed steps, a barrier; images/s on rank 0.
The models are Bonfire's LeNet and small ResNet, layer for layer.

usage: python torch_ddp_train.py [--world 2] [--threads 1] [--steps 100] [--batch 100]
                                 [--model lenet|resnet] [--data-dir DIR]
                                 [--device cpu|cuda] [--json]
"""
import argparse
import gzip
import json
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WARMUP = 5


def load(data_dir, kind):
    def read(name, offset):
        path = os.path.join(data_dir, name)
        opener = gzip.open if os.path.exists(path + ".gz") else open
        with opener(path + ".gz" if opener is gzip.open else path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    x = read(f"{kind}-images-idx3-ubyte", 16).reshape(-1, 1, 28, 28)
    y = read(f"{kind}-labels-idx1-ubyte", 8)
    x = torch.tensor((x.astype(np.float32) / 255.0 - 0.5) / 0.5)
    return x, torch.tensor(y.astype(np.int64))


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def conv(cin, cout, kernel, stride):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1), nn.BatchNorm2d(cout)
        reshape = stride != 1 or cin != cout
        self.downsample_conv = conv(cin, cout, 1, stride) if reshape else None
        self.downsample_bn = nn.BatchNorm2d(cout) if reshape else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = self.downsample_bn(self.downsample_conv(x)) if self.downsample_conv else x
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = conv(1, 16, 3, 1), nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def run(rank, args, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = args.world
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device(args.device)
    x, y = load(args.data_dir, "train")
    x, y = x.to(device), y.to(device)
    net = (LeNet() if args.model == "lenet" else ResNet()).to(device)
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    per_rank = args.batch // world
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[rank::world].to(device)

    # Losses stay on the device (no sync inside the timed window); the
    # report reads them at the end to show that the run learned.
    losses = []

    def step(i):
        start = (i * per_rank) % (len(idx) - per_rank)
        b = idx[start : start + per_rank]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[b]), y[b])
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    for i in range(WARMUP):
        step(i)
    if world > 1:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(WARMUP + i)
    if world > 1:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if rank == 0:
        row = {
            "impl": "torch",
            "device": args.device,
            "model": args.model,
            "world": world,
            "threads": args.threads,
            "global_batch": args.batch,
            "steps": args.steps,
            "images_per_sec": args.steps * args.batch / dt,
            "step_ms": dt / args.steps * 1e3,
            # Mean loss of the first 5 and the last 10 steps.
            "loss_start": torch.stack(losses[:5]).mean().item(),
            "loss_end": torch.stack(losses[-10:]).mean().item(),
        }
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"torch {args.model}: {row['images_per_sec']:.0f} images/s, {row['step_ms']:.2f} ms/step", flush=True)
    if world > 1:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads of each process")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--model", choices=["lenet", "resnet"], default="lenet")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for one process on the GPU")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.world == 1:
        run(0, args, 0)
    else:
        mp.spawn(run, args=(args, free_port()), nprocs=args.world)
