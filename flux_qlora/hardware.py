"""What the device can run: attention kernels, bf16, FP8. Pure rules over (device, compute capability, dtype), so
they are tested on the CPU for every GPU our users have, from Colab's T4 (7.5: fp16 only) to an H100 (9.0).

The kernels' own requirements (PyTorch 2.x SDPA): flash attention needs compute capability >= 8.0 and fp16/bf16 on
a GPU (on the CPU it runs in any dtype); cuDNN attention >= 8.0 and fp16/bf16; the memory-efficient kernel runs on
every CUDA GPU in fp32 and fp16 (bf16 from 8.0), not on the CPU; the math kernel runs everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flux_qlora.errors import UserError

# diffusers attention backends by the kernel family they run; any other name is left to diffusers to judge.
NEEDS_AMPERE_HALF = {"_native_flash", "_native_cudnn", "flash", "flash_hub", "flash_varlen", "flash_varlen_hub"}
NEEDS_HOPPER_HALF = {"_flash_3", "_flash_varlen_3", "_flash_3_hub", "_flash_3_varlen_hub"}
CPU_KERNELS = {"native", "_native_math", "_native_flash"}


@dataclass(frozen=True)
class Device:
    """The device a run computes on, as the rules need it: a GPU's compute capability and name, or the CPU."""

    type: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None = None
    name: str = "CPU"
    memory_gib: float | None = None  # what this process may allocate on the GPU

    @classmethod
    def of(cls, device: torch.device) -> Device:
        if device.type != "cuda":
            return cls(device.type)
        index = device.index if device.index is not None else torch.cuda.current_device()
        # A per-process cap (torch.cuda.set_per_process_memory_fraction, as the emulated consumer GPUs use) counts.
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
        memory = torch.cuda.get_device_properties(index).total_memory * fraction / 2**30
        return cls("cuda", torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index), memory)

    @property
    def has_bf16(self) -> bool:
        return self.type != "cuda" or self.capability >= (8, 0)

    @property
    def has_fp8(self) -> bool:
        return self.type == "cuda" and self.capability >= (8, 9)

    @classmethod
    def for_launch(cls) -> Device:
        """The device accelerate will give this process (before the Accelerator exists): the CPU when there is no
        GPU or ACCELERATE_USE_CPU is set, else the process's local GPU."""
        if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            return cls("cpu")
        return cls.of(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


def check_device(flag: str, value: str | None) -> torch.device:
    """The device a `--device` flag names (default: the GPU if there is one, else the CPU), refused in one line
    when this machine hasn't got it: a malformed name, CUDA without a GPU, a GPU index it doesn't have."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {value} is not a device name: give cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{flag} {value}: this machine has no CUDA GPU (or no driver PyTorch can use): give "
                            f"{flag} cpu, or leave the flag out.")
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {value}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}: give "
                            "one of those.")
    elif device.type not in ("cpu", "cuda"):
        if not (device.type == "mps" and torch.backends.mps.is_available()):
            raise UserError(f"{flag} {value}: this machine has no {device.type} device: give cpu or cuda.")
    return device


def backend_problem(backend: str, device: Device, dtype: torch.dtype, head_dim: int = 128) -> str | None:
    """Why `backend` has no kernel for this device, dtype and head size; None when it has one."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type != "cuda":
        return None if backend in CPU_KERNELS else "it needs a CUDA GPU"
    if dtype == torch.bfloat16 and not device.has_bf16:
        return "this GPU has no bf16"
    if backend in NEEDS_AMPERE_HALF | NEEDS_HOPPER_HALF:
        needed = (9, 0) if backend in NEEDS_HOPPER_HALF else (8, 0)
        if device.capability < needed:
            return f"it needs compute capability >= {needed[0]}.{needed[1]}"
        if not half:
            return "it has no fp32 kernel (train with --mixed_precision bf16 or fp16)"
        if head_dim > 256 or head_dim % 8:
            return f"it takes heads of at most 256 (a multiple of 8), not {head_dim}"
    return None


def pick_attention_backend(requested: str | None, device: Device, dtype: torch.dtype, head_dim: int = 128,
                           training: bool = True, prefer_cudnn: bool = True) -> str | None:
    """The attention backend to use: `requested` if it can run here (else one line saying why and what would), or
    the default. Training defaults to PyTorch's cuDNN kernel from Hopper on, its flash kernel on the other GPUs
    that have it in this dtype and the memory-efficient kernel on the rest (T4, V100, fp32), which always has one;
    inference and the CPU keep PyTorch SDPA's own choice (None). Every family's blocks have the workaround for the
    cuDNN backward (`Family.give_attention_contiguous_gradients`); `prefer_cudnn`: cuDNN is the Hopper default for
    this model (measured faster there)."""
    if requested:
        problem = backend_problem(requested, device, dtype, head_dim)
        if problem:
            fallback = pick_attention_backend(None, device, dtype, head_dim, training, prefer_cudnn) or "native"
            raise UserError(f"--attention_backend {requested} can't run on {device.describe()} in "
                            f"{str(dtype).removeprefix('torch.')}: {problem}. Use --attention_backend {fallback} "
                            "or leave the flag out.")
        return requested
    if device.type != "cuda" or not training:
        return None
    # From Hopper on, PyTorch's cuDNN kernel: faster than flash at Flux's long sequences (BENCHMARKS.md), and correct
    # once its backward gets contiguous gradients from the single blocks (set_attention_backend sees to it);
    # measured on H100/H200 only, so Ampere and Ada keep flash.
    cudnn = prefer_cudnn and device.capability >= (9, 0)
    if cudnn and backend_problem("_native_cudnn", device, dtype, head_dim) is None:
        return "_native_cudnn"
    return "_native_flash" if backend_problem("_native_flash", device, dtype, head_dim) is None else "_native_efficient"


def default_dtype(device: Device) -> str:
    """The half precision this device computes in: bf16 on the CPU and from compute capability 8.0, fp16 on GPUs
    without bf16 (Colab's T4, V100), where Flux and T5 clip their activations to fp16's range themselves."""
    return "bf16" if device.has_bf16 else "fp16"


def check_bf16(flag: str, value: str, device: Device) -> None:
    """bf16 asked for (`flag value`) on a GPU without it (T4, V100) stops here with the fix, before a library's
    less helpful error; fp16 is the precision those GPUs have."""
    if value == "bf16" and not device.has_bf16:
        raise UserError(f"{flag} bf16: {device.describe()} has no bf16. Use {flag} fp16"
                        + (" (loss scaling is automatic) or no (fp32)." if flag == "--mixed_precision" else "."))


def check_fp8_device(device: Device, flag: str) -> None:
    """FP8 matrix units arrived with compute capability 8.9 (Ada); refuses anything older, and the CPU."""
    if device.type != "cuda":
        raise UserError(f"{flag} needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                        "this run is on the CPU. Drop the flag.")
    if not device.has_fp8:
        raise UserError(f"{flag} needs compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                        f"{device.describe()} has less. Drop the flag.")


def check_fp8_training(base_precision: str, device: Device, weight_dtype: torch.dtype) -> None:
    """--do_fp8_training needs FP8 tensor cores (compute capability 8.9+). On the NF4 base the FP8 products compute
    from bf16 and write bf16, and torch runs them on the CPU too (slowly: what the tests run)."""
    from flux_qlora.nf4 import cpu_fp8_gemm_runs  # imports bitsandbytes

    if base_precision == "nf4" and weight_dtype != torch.bfloat16:
        raise UserError("--do_fp8_training on the NF4 base computes from bf16: add --mixed_precision bf16.")
    if not (base_precision == "nf4" and device.type == "cpu"):
        check_fp8_device(device, "--do_fp8_training")
    elif not cpu_fp8_gemm_runs():
        raise UserError(f"--do_fp8_training on the CPU needs torch's row-wise scaled FP8 products (torch 2.13, as "
                        f"requirements.txt pins; this is torch {torch.__version__}): install it or drop the flag.")
