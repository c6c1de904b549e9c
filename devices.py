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
    """'auto' -> cuda (this rank's GPU), then mps, then cpu; or the named device."""
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


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 arithmetic: CUDA GPUs that have it, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def fast_settings(
    device: torch.device, precision: str = "auto", channels_last: bool = True
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use channels_last_3d) for a device.

    precision auto: bf16 autocast where the device computes bf16 natively (CUDA GPUs from
    Ampere on; CPUs with AVX512-BF16 or AMX), else fp32. On CPUs, unet_model.Conv3d keeps the
    one convolution shape that oneDNN's bf16 kernel gets wrong in fp32.
    channels_last_3d pays on CUDA and on CPUs (oneDNN), not on MPS.
    """
    native = bf16_supported(device)
    if precision == "bf16" and not native:
        raise ValueError(f"[training] precision = bf16, but {device} has no native bf16")
    use_bf16 = native and precision != "fp32"
    return (torch.bfloat16 if use_bf16 else None), channels_last and device.type != "mps"
