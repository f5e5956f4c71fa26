"""The runtime below training, evaluation and inference: the device (cuda, then mps, then cpu), bf16
autocast on CUDA, seeding, and the distributed context (rank, world size, reductions) of a torchrun
worker."""

from __future__ import annotations

import contextlib
import io
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def select_device(preference: str = "auto") -> torch.device:
    """The device this process trains on; a torchrun worker on CUDA takes the GPU of its LOCAL_RANK."""
    if preference in ("auto", "cuda") and torch.cuda.is_available() and in_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but torch sees no MPS device")
    return torch.device(preference)


def amp_enabled(device: torch.device, amp: bool) -> bool:
    """bf16 autocast on CUDA (needs no loss scaling); CPU and MPS run in fp32."""
    return amp and device.type == "cuda"


@contextlib.contextmanager
def autocast(device: torch.device, amp: bool) -> Iterator[None]:
    if amp_enabled(device, amp):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def memory_format(device: torch.device, channels_last: bool | str) -> torch.memory_format:
    """The memory layout of the model's convolution weights and of the training batches. NHWC
    (channels_last) is the layout of cuDNN's tensor-core convolutions, so on CUDA it spares a transpose
    around every convolution; `auto` uses it there only (on CPU oneDNN picks its own blocked layout)."""
    on = device.type == "cuda" if channels_last == "auto" else bool(channels_last)
    return torch.channels_last if on else torch.contiguous_format


def compile_encoder(model: torch.nn.Module, setting: bool | str) -> None:
    """torch.compile the model's `encode` (the backbone: nearly all of a step's compute) in place, for
    every caller: the step loop, DDP's forward, validation and FAMO's re-evaluation. The parameters stay
    the model's own, so state dicts, checkpoints and saved weights keep their keys (compiling the whole
    module would prefix them with `_orig_mod.`); the heads, losses and weighting methods stay eager,
    where per-task autograd calls (gradient balancing) need no graph breaks. Compiles on the first call
    of each mode (training, validation under no_grad), which the first steps pay."""
    if setting is False:
        return
    mode = None if setting is True else str(setting)
    model.encode = torch.compile(model.encode, mode=mode)  # an instance attribute shadows the method


def place_model(model: torch.nn.Module, device: torch.device, channels_last: bool | str, compile: bool | str) -> torch.nn.Module:
    """The model on `device` in the memory layout of `train.channels_last`, its encoder compiled as
    `train.compile` says: how `fit` (and the throughput benchmark) set a model up for training."""
    model = model.to(device, memory_format=memory_format(device, channels_last))
    compile_encoder(model, compile)
    return model


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --- the distributed context -----------------------------------------------------------------------
# torchrun (torch.distributed.run) starts one process per GPU (or CPU slot) with RANK, LOCAL_RANK,
# WORLD_SIZE and the rendezvous in the environment; `init_distributed` joins the process group (NCCL on
# CUDA, gloo on CPU) and every collective the training needs goes through the `Distributed` object
# below. With one process it is a no-op everywhere, so the single-process path computes exactly what
# it did before distributed training existed.


@dataclass(frozen=True)
class Distributed:
    """Rank, world size and the reductions training uses; `SINGLE` (world size 1) does nothing."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where the backend's tensors live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, checkpoints and MLflow records."""
        return self.rank == 0

    def _reduce(self, tensor: Tensor, op: torch.distributed.ReduceOp) -> Tensor:
        if not self.enabled:
            return tensor
        t = tensor.detach().to(self.device).clone()
        torch.distributed.all_reduce(t, op=op)
        return t.to(tensor.device)

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over all ranks (a new tensor on `tensor`'s device)."""
        return self._reduce(tensor, torch.distributed.ReduceOp.SUM)

    def mean(self, tensor: Tensor) -> Tensor:
        """The element-wise mean over all ranks (sum / world size, the same on every rank)."""
        return self.sum(tensor) / self.world_size if self.enabled else tensor

    def average_gradients(self, params: Sequence[Tensor]) -> None:
        """Replace each `.grad` by its mean over the ranks, in one flat all-reduce. Only for the
        gradients a weighting method takes itself (torch.autograd.grad, outside DDP's hooks); every
        rank must hold gradients for the same parameters."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = self.mean(_flatten_dense_tensors(grads))
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def broadcast_state(self, state: Any) -> Any:
        """Rank 0's `state` (tensors, numbers, strings, lists, dicts: what a checkpoint holds) on every
        rank, sent as torch.save bytes and read back with weights_only=True (nothing is unpickled)."""
        if not self.enabled:
            return state
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        payload = b""
        if self.is_main:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = buffer.getvalue()
            size[0] = len(payload)
        torch.distributed.broadcast(size, src=0)
        data = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
            if self.is_main
            else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        )
        torch.distributed.broadcast(data, src=0)
        if self.is_main:
            return state
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


SINGLE = Distributed()
_context: Distributed = SINGLE

LAUNCHED_ENV = "TORCHELASTIC_RUN_ID"
"""Set by torchrun in every worker it starts: a process that has it is a worker, not the launcher."""


def distributed() -> Distributed:
    """This process's distributed context (SINGLE unless `init_distributed` joined a process group)."""
    return _context


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_preference: str = "auto", backend: str = "auto") -> Distributed:
    """Join the process group torchrun set up (env:// rendezvous), once per process. NCCL when the
    processes train on CUDA, else gloo; each process takes the GPU of its LOCAL_RANK."""
    global _context
    if _context.enabled or not in_torchrun():
        return _context
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = select_device(device_preference).type == "cuda"
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group(backend=backend)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    _context = Distributed(rank=rank, world_size=world, local_rank=local, device=device)
    return _context


def shutdown_distributed() -> None:
    global _context
    if _context.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _context = SINGLE
