#!/usr/bin/env python
"""What is allocated at the peak of a CUDA memory snapshot (`train_qlora_flux.py --profile_dir` writes one).

    python bench/memory_at_peak.py runs/x/profile/memory_snapshot.pickle

Replays the snapshot's allocation trace, finds the moment the most memory was allocated and prints the live
tensors grouped by where they were allocated (the innermost frames outside torch's own code).
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

GiB = 2**30


def frame_key(frames: list[dict], depth: int) -> str:
    python = [f for f in frames if f["filename"].endswith(".py")]  # C++ frames name no file
    ours = [f for f in python if "/torch/" not in f["filename"]]
    chosen = (ours or python)[:depth]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in chosen) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot")
    parser.add_argument("--depth", type=int, default=2, help="Frames in each group's name.")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    trace = [e for device in snapshot["device_traces"] for e in device]
    live, current, peak, peak_live, peak_event = {}, 0, 0, {}, None
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, peak_live, peak_event = current, dict(live), event
    # What was allocated before recording started (weights, optimizer state, saved inputs) never shows in the
    # trace: it is what the segments hold now minus what the trace left allocated.
    blocks = [b for segment in snapshot["segments"] for b in segment["blocks"]]
    allocated_now = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    before = allocated_now - current
    print(f"peak: {(before + peak) / GiB:.3f} GiB = {before / GiB:.3f} GiB allocated before the recording "
          f"+ {peak / GiB:.3f} GiB from {len(peak_live)} allocations made during it\n")
    if peak_event:
        print(f"reached by a {peak_event['size'] / 2**20:.1f} MiB allocation at "
              f"{frame_key(peak_event.get('frames', []), 4)}\n")
    groups, sizes = defaultdict(lambda: [0, 0]), defaultdict(int)
    for event in peak_live.values():
        group = groups[frame_key(event.get("frames", []), args.depth)]
        group[0] += event["size"]
        group[1] += 1
        sizes[event["size"]] += 1
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{size / GiB:8.3f} GiB {count:6d} x  {key}")
    print("\nsizes of the allocations live at the peak (MiB x count):")
    print(", ".join(f"{size / 2**20:.1f} x {count}" for size, count in sorted(sizes.items(), reverse=True)))


if __name__ == "__main__":
    main()
