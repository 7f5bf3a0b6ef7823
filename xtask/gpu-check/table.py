"""The GPU check's speed table, from the runs of `run.sh` in DIR.

Each Bonfire row is a `bonfire train --out DIR/MODEL-ROW` run: images/s over
its steps after the warm-up (each step's own time, so that the evaluations
between epochs are left out; the ratios use it), images/s at its median step
(the steady state, without one-off stalls such as a kernel compiled late),
the host's median time in each phase of a step (making the batch, the
gradients with the strategy's averaging, the update, reading the loss:
where the host waits for the device), its loss at the start and the end,
and the test accuracy after its last step. PyTorch's row (MODEL-torch.json) and
Burn's own DDP (MODEL-burn-ddp.json) come from their programs. A row that
did not learn (the mean loss of its last 10 steps above 0.6 times that of
its first 5, or LeNet's test accuracy under 0.6) fails the check.

usage: [MODELS="lenet resnet"] python table.py DIR
"""
import csv
import json
import os
import statistics
import sys

MODELS = {"lenet": {"batch": 100, "warmup": 20}, "resnet": {"batch": 256, "warmup": 10}}
ROWS = ["alone", "ddp-nccl-1", "dp-2", "ring-2"]
ACCURACY_FLOOR = {"lenet": 0.6}
LEARNED = 0.6
PHASES = ["data", "gradients", "update", "read"]


def bonfire_row(folder, batch, warmup):
    with open(os.path.join(folder, "steps.csv")) as f:
        steps = list(csv.DictReader(f))
    with open(os.path.join(folder, "metrics.csv")) as f:
        epochs = list(csv.DictReader(f))
    losses = [float(s["loss"]) for s in steps]
    timed = steps[warmup:]
    seconds = sum(float(s["seconds"]) for s in timed)
    median = statistics.median(float(s["seconds"]) for s in timed)
    accuracy = next((float(e["test_accuracy"]) for e in reversed(epochs) if e["test_accuracy"]), None)
    # The host's time in each phase of a step, median over the timed steps:
    # where it stops for the device shows here (see HostPhases).
    phases = {p: statistics.median(float(s[p]) for s in timed) for p in PHASES if p in timed[0]}
    return {
        "host_ms": "/".join(f"{1e3 * phases[p]:.2f}" for p in PHASES) if len(phases) == len(PHASES) else None,
        "images_per_sec": len(timed) * batch / seconds if seconds > 0 else None,
        "median_images_per_sec": batch / median if median > 0 else None,
        "loss_start": sum(losses[:5]) / 5,
        "loss_end": sum(losses[-10:]) / 10,
        "test_accuracy": accuracy,
    }


def read_rows(run_dir, model):
    spec = MODELS[model]
    rows = {}
    for row in ROWS:
        folder = os.path.join(run_dir, f"{model}-{row}")
        try:
            rows[row] = bonfire_row(folder, spec["batch"], spec["warmup"])
        except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
            rows[row] = {"error": f"{type(e).__name__}: {e}"}
    for name, file in [("PyTorch", "torch"), ("Burn DDP", "burn-ddp")]:
        path = os.path.join(run_dir, f"{model}-{file}.json")
        try:
            with open(path) as f:
                rows[name] = json.loads(f.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
    return rows


def learned(model, row):
    if "error" in row:
        return False
    ok = row["loss_end"] < LEARNED * row["loss_start"]
    floor = ACCURACY_FLOOR.get(model)
    if floor is not None and row.get("test_accuracy") is not None:
        ok = ok and row["test_accuracy"] >= floor
    return ok


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def main(run_dir):
    failed = False
    print(
        "| model | row | images/s | / PyTorch | / alone | median step, images/s "
        "| host ms a step: data/gradients/update/read | loss first 5 -> last 10 | test acc | learned |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|---:|---|")
    # The models run.sh measured (its MODELS, both by default).
    for model in os.environ.get("MODELS", " ".join(MODELS)).split():
        if model not in MODELS:
            sys.exit(f"unknown model {model} in MODELS (lenet, resnet)")
        rows = read_rows(run_dir, model)
        torch = rows["PyTorch"].get("images_per_sec")
        alone = rows["alone"].get("images_per_sec")
        for name, row in rows.items():
            if "error" in row:
                print(f"| {model} | {name} | not measured: {row['error']} | | | | | | | |")
                # Burn's DDP is an optional row: its program may not be in the bundle.
                failed |= name != "Burn DDP"
                continue
            ips = row.get("images_per_sec")
            ok = learned(model, row)
            failed |= not ok
            vs_torch = ips / torch if ips and torch else None
            vs_alone = ips / alone if ips and alone else None
            print(
                f"| {model} | {name} | {fmt(ips, '.0f')} | {ratio(vs_torch)} | {ratio(vs_alone)} "
                f"| {fmt(row.get('median_images_per_sec'), '.0f')} | {row.get('host_ms') or '-'} "
                f"| {row['loss_start']:.3f} -> {row['loss_end']:.3f} | {fmt(row.get('test_accuracy'), '.3f')} "
                f"| {'yes' if ok else 'NO'} |"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
