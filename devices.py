"""Devices and processes: which device, how many CPU threads, bf16 or fp32, and torchrun.

`Distributed.from_environment()` reads torchrun's variables (a plain run is rank 0 of world 1);
`fast_settings` picks autocast and memory layout for a device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Process-group facts: rank 0 of world 1 for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device_kind: str) -> Distributed:
        """Join torchrun's process group (nccl on CUDA, gloo otherwise) when WORLD_SIZE > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this rank's GPU), then mps, then cpu; or the named device (cpu, cuda,
    mps); ValueError for any other name, RuntimeError for a CUDA device that is not there."""
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or mps")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("[training] device = cuda, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def configure_threads(threads: int, world_size: int) -> int:
    """CPU threads per process: `threads`, or all cores shared among the local processes."""
    count = threads or max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(count)
    return count


def cuda_bf16_native(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of this compute capability has bf16 arithmetic in hardware (Ampere,
    8.0, and later). torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (V100,
    T4), and there cuDNN has no bf16 convolution: every Conv3d would take a slow path."""
    return tuple(capability) >= (8, 0)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 arithmetic: CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return cuda_bf16_native(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def channels_last_pays(device_type: str, norm: str) -> bool:
    """Whether channels_last_3d memory is worth using: on CPUs (oneDNN), and on CUDA except with
    instance norm, whose kernel makes its input contiguous: every norm would convert the layout
    and the next convolution convert it back (pytorch issues 72341, 59168). `python bench.py
    --gpu-check` measures both layouts on a GPU. Not on MPS."""
    if device_type == "cuda":
        return norm != "instance"
    return device_type == "cpu"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 for autocast, or None for fp32. precision auto: bf16 where the device computes it
    natively (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), else fp32; bf16 where it
    does not is an error. On CPUs, unet_model.Conv3d keeps the one convolution shape that
    oneDNN's bf16 kernel gets wrong in fp32."""
    native = bf16_supported(device)
    if precision == "bf16" and not native:
        raise ValueError(f"[training] precision = bf16, but {device} has no native bf16")
    return torch.bfloat16 if native and precision != "fp32" else None


def fast_settings(
    device: torch.device, precision: str, channels_last: bool, norm: str
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use channels_last_3d) for a device and the model's
    norm: autocast_dtype, and the [training] channels_last wish where channels_last_pays."""
    return autocast_dtype(device, precision), channels_last and channels_last_pays(
        device.type, norm
    )
