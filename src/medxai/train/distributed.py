"""Data-parallel training under ``torchrun``: PyTorch's DistributedDataParallel, NCCL on GPUs, gloo on the CPU.

``torchrun --nproc-per-node N -m medxai train ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` of the rendezvous); :func:`start` joins the process group they
describe. Every rank trains on its share of each global batch (:func:`medxai.data.prepared.batch_order`), DDP
averages the gradients, so a step sees the same batch as a single-process run of the same ``train.batch_size``.
Rank 0 alone writes the run folder; the others wait at barriers where they need what it wrote.

Deviation from single-process training, and why: on GPUs BatchNorm is converted to
:class:`torch.nn.SyncBatchNorm`, so batch statistics are those of the global batch; PyTorch's SyncBatchNorm runs
on CUDA only, so on the CPU (gloo) each rank normalises with its own share's statistics, as plain DDP does. The
running statistics are taken from rank 0 after every epoch, so every rank validates the same model.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medxai.errors import ConfigError

__all__ = ["Distributed", "start", "stop", "wrap", "from_environment", "restart_count", "SINGLE"]

logger = logging.getLogger(__name__)

#: How long ranks wait at a barrier: rank 0 may be decoding a large split into the cache meanwhile.
BARRIER_TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world`` processes (1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (returned as is by one process)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def gather_rows(self, rows: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
        """Put every rank's ``rows`` (``(n, ...)``, equal ``n`` on every rank) at their ``positions`` in one
        ``(count, ...)`` tensor, the same on all ranks; padding duplicates write the same row twice."""
        if not self.active:
            out = rows.new_empty((count, *rows.shape[1:]))
            out[positions] = rows
            return out
        device = _collective_device()
        rows, positions = rows.to(device), positions.to(device)
        gathered_rows = [torch.empty_like(rows) for _ in range(self.world)]
        gathered_positions = [torch.empty_like(positions) for _ in range(self.world)]
        dist.all_gather(gathered_rows, rows)
        dist.all_gather(gathered_positions, positions)
        out = rows.new_empty((count, *rows.shape[1:]))
        out[torch.cat(gathered_positions)] = torch.cat(gathered_rows)
        return out.cpu()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics)."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)


SINGLE = Distributed()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment() -> Distributed:
    """The job ``torchrun`` describes in the environment, or :data:`SINGLE` outside ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def restart_count() -> int:
    """How often ``torchrun`` restarted this job's workers (``--max-restarts``); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def start(device_name: str) -> tuple[Distributed, str]:
    """Join the process group ``torchrun`` started, if any; return this process's place and its device name.

    On CUDA each process takes the GPU of its local rank (NCCL); on the CPU they use gloo.

    Raises:
        ConfigError: a distributed job asked for more GPUs per node than this node has.
    """
    job = from_environment()
    if not job.active:
        return job, device_name
    if dist.is_initialized():
        return job, device_name
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if job.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {job.rank} has local rank {job.local_rank}, but this node has "
                              f"{torch.cuda.device_count()} GPU(s): --nproc-per-node must not exceed them")
        torch.cuda.set_device(job.local_rank)
        device_name = f"cuda:{job.local_rank}"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    logger.info("distributed training: rank %d of %d (%s)", job.rank, job.world, backend)
    return job, device_name


def stop(job: Distributed) -> None:
    if job.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, job: Distributed, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (with SyncBatchNorm on CUDA); ``model`` itself for one process."""
    if not job.active:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return torch.nn.parallel.DistributedDataParallel(model)
