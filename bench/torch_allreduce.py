"""PyTorch Gloo all-reduce baseline for `cargo xtask bench allreduce`.

Measured exactly as Bonfire's own figures: WORLD processes on loopback, f32
buffers, two warm-up calls, a barrier, ten timed calls, a barrier; the mean
time per call on rank 0. busbw = bytes / time * 2(n-1)/n (nccl-tests).

usage: python torch_allreduce.py [--world N] [--sizes-mib 1,4,25,100] [--json]
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP, ITERS = 2, 10


def run(rank, world, sizes, port, as_json):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mib in sizes:
        nbytes = mib << 20
        t = torch.ones(nbytes // 4)
        for _ in range(WARMUP):
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(ITERS):
            dist.all_reduce(t)
        dist.barrier()
        dt = (time.perf_counter() - t0) / ITERS
        if rank == 0:
            busbw = nbytes / dt / 1e9 * 2 * (world - 1) / world
            if as_json:
                print(json.dumps({"impl": "gloo", "world": world, "bytes": nbytes, "busbw_gbs": round(busbw, 3)}), flush=True)
            else:
                print(f"gloo world={world} size={mib}MiB time={dt * 1e3:.2f}ms busbw={busbw:.2f}GB/s", flush=True)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes-mib", default="1,4,25,100")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes_mib.split(",")]
    mp.spawn(run, args=(a.world, sizes, free_port(), a.json), nprocs=a.world)
