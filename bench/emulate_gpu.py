#!/usr/bin/env python
"""Runs one of the scripts as if on a smaller GPU, for the consumer-GPU rows of BENCHMARKS.md:

    python bench/emulate_gpu.py t4 train_qlora_flux.py --mixed_precision fp16 ...

Profiles: `t4` = Colab's T4 (14.4 GiB, compute capability 7.5: no bf16, no flash or cuDNN attention, no FP8), `24gb`
(23 GiB), `12gb` (11.5 GiB), `8gb` (7.5 GiB), or a number of GiB; all but `t4` keep the GPU's own capabilities.
The memory cap is `torch.cuda.set_per_process_memory_fraction` (the memory plan reads it too); for `t4` torch
reports the T4's capability and name, so the scripts' own rules pick what a T4 can run, and PyTorch's flash and
cuDNN attention kernels are switched off. Time is the host GPU's, not the card's: the profiles show memory and
whether it runs.
"""

from __future__ import annotations

import runpy
import sys

import torch

# name -> (GiB the process may allocate, compute capability to report or None, device name to report or None)
# A T4 reports 15,843,721,216 bytes (14.76 GiB), and the CUDA context takes ~0.35 GiB of them outside PyTorch's
# allocator, which is all the cap limits: 14.4 GiB for the allocator (issue 14 first named 15 GiB, which let an
# inference run of 14.56 GiB pass that a real T4 could not hold).
PROFILES = {
    "t4": (14.4, (7, 5), "Tesla T4 (emulated)"),
    "24gb": (23.0, None, None),
    "12gb": (11.5, None, None),
    "8gb": (7.5, None, None),
}


def emulate(profile: str) -> None:
    gib, capability, name = PROFILES[profile] if profile in PROFILES else (float(profile), None, None)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(gib / total)
    if capability is not None:
        torch.cuda.get_device_capability = lambda device=None: capability
        torch.cuda.get_device_name = lambda device=None: name
        torch.cuda.is_bf16_supported = lambda including_emulation=True: False
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    print(f"emulating {profile}: {gib} GiB{f', compute capability {capability}' if capability else ''}",
          file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) < 3 or not (sys.argv[1] in PROFILES or sys.argv[1].replace(".", "", 1).isdigit()):
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(PROFILES)},GIB}} SCRIPT [ARGS...]")
    emulate(sys.argv[1])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
