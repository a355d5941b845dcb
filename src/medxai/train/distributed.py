"""Data-parallel training under ``torchrun``: PyTorch's DistributedDataParallel, NCCL on GPUs, gloo on the CPU.

``torchrun --nproc-per-node N -m medxai train ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` of the key-value store its agent serves); :func:`start` joins
the process group they describe. Every rank trains on its share of each global batch
(:func:`medxai.data.prepared.batch_order`), DDP averages the gradients, so a step sees the same batch as a
single-process run of the same ``train.batch_size``. Rank 0 alone writes the run folder; the others wait at
barriers where they need what it wrote.

Two clocks, on purpose. Collectives (the gradient all-reduce, the gathered validation logits) wait only for the
other ranks' share of the same work, and give up after :data:`COLLECTIVE_TIMEOUT`, so that a stuck attempt fails
in minutes, not hours, and ``torchrun`` restarts it. Work one rank does alone (rank 0 decoding the cache, checking
the data, writing checkpoints, finishing the run) is waited for at :meth:`Distributed.barrier`, on the store,
outside the process group, for up to :data:`SOLO_WORK_TIMEOUT`. Each attempt meets in a namespace of the store of
its own (:func:`_attempt_store`): a restarted group never reads the killed attempt's addresses. Under ``torchrun``
a worker dies with its agent (:func:`_die_with_agent`).

Deviation from single-process training, and why: on GPUs BatchNorm is converted to
:class:`torch.nn.SyncBatchNorm`, so batch statistics are those of the global batch; PyTorch's SyncBatchNorm runs
on CUDA only, so on the CPU (gloo) each rank normalises with its own share's statistics, as plain DDP does. The
running statistics are taken from rank 0 after every epoch, so every rank validates the same model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import itertools
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medxai.errors import ConfigError, DistributedError

__all__ = ["Distributed", "session", "start", "stop", "wrap", "from_environment", "restart_count", "SINGLE"]

logger = logging.getLogger(__name__)

#: How long a rank waits for the others inside a collective (the process group's timeout). What it waits for there
#: is the other ranks' share of the same work: one training step, one share of the validation set, seconds even for
#: ResNet-18 at 224 px on a laptop CPU, so a minute leaves a wide margin. A stuck attempt, in turn, fails within a
#: minute (gloo's first connection within five: it waits 5 x this) and ``torchrun`` restarts it, where the former
#: 4 hours let a restarted CPU job hang for most of a day.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=1)
#: How long rank 0 waits for every other rank to join when the job starts: they start together, but each imports
#: torch and medxai first, perhaps from a cold shared file system.
JOIN_TIMEOUT = datetime.timedelta(minutes=2)
#: How long the ranks wait at :meth:`Distributed.barrier` for work one rank does alone: decoding a large split into
#: the cache, the data check, finishing the run (calibration, domain guard, report, gallery).
SOLO_WORK_TIMEOUT = datetime.timedelta(hours=4)

_FAILED = "failed"  # the key a failing rank sets in its attempt's namespace (see Distributed.announce_failure)
_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when the thread that created it ends


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world`` processes (1: not distributed), and the job's store
    (this attempt's namespace of it, see :func:`start`) once it has joined."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: dist.Store | None = dataclasses.field(default=None, compare=False, repr=False)
    _barriers: Iterator[int] = dataclasses.field(default_factory=itertools.count, init=False, compare=False,
                                                 repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Return once every rank has reached this barrier (the same, n-th, call on each rank).

        It is kept on the store, outside the process group: rank 0 may be alone at work for hours before it arrives
        (decoding the cache, finishing the run), which no collective should wait for (see :data:`COLLECTIVE_TIMEOUT`).

        Raises:
            DistributedError: another rank failed (:meth:`announce_failure`), or :data:`SOLO_WORK_TIMEOUT` passed.
        """
        if not self.active:
            return
        store = self._joined_store()
        key = f"barrier {next(self._barriers)}"
        if store.add(key, 1) == self.world:
            store.set(f"{key} passed", "")
        _wait_for_key(store, f"{key} passed", SOLO_WORK_TIMEOUT, watch_failures=True)

    def announce_failure(self, error: BaseException) -> None:
        """Tell the ranks waiting at a barrier that this one failed, so that they stop now rather than after
        :data:`SOLO_WORK_TIMEOUT`. (``torchrun`` stops them as well once this process exits; this covers a process
        that fails and lives on.) Only the error's type travels: its message may name server paths."""
        if not self.active or self.store is None:
            return
        try:
            self.store.set(_FAILED, f"rank {self.rank} failed ({type(error).__name__})")
        except (RuntimeError, OSError):  # the store went with the agent: nobody is left waiting on it
            pass

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

    def _joined_store(self) -> dist.Store:
        if self.store is None:
            raise DistributedError(f"rank {self.rank} has not joined the job's store (distributed.start)")
        return self.store


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

    On CUDA each process takes the GPU of its local rank (NCCL); on the CPU they use gloo. Under ``torchrun`` the
    process first asks to be killed with its agent (:func:`_die_with_agent`), and the group meets in a namespace of
    the store that no earlier attempt wrote (:func:`_attempt_store`).

    Raises:
        ConfigError: a distributed job asked for more GPUs per node than this node has.
        DistributedError: a rank did not join within :data:`JOIN_TIMEOUT`, or ``torchrun``'s agent is gone.
    """
    job = from_environment()
    if not job.active or dist.is_initialized():
        return job, device_name
    _die_with_agent()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if job.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {job.rank} has local rank {job.local_rank}, but this node has "
                              f"{torch.cuda.device_count()} GPU(s): --nproc-per-node must not exceed them")
        torch.cuda.set_device(job.local_rank)
        device_name = f"cuda:{job.local_rank}"
    backend = "nccl" if use_cuda else "gloo"
    job_store, _, _ = next(dist.rendezvous("env://", timeout=JOIN_TIMEOUT))
    store = _attempt_store(job_store, job.rank, job.world)
    dist.init_process_group(backend, store=store, rank=job.rank, world_size=job.world, timeout=COLLECTIVE_TIMEOUT)
    logger.info("distributed training: rank %d of %d (%s)", job.rank, job.world, backend)
    return dataclasses.replace(job, store=store), device_name


def stop(job: Distributed) -> None:
    if job.active and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device_name: str) -> Iterator[tuple[Distributed, str]]:
    """:func:`start` on entry, :func:`stop` on exit; a failure inside is announced to the ranks waiting at a
    barrier (:meth:`Distributed.announce_failure`) before it propagates."""
    job, device_name = start(device_name)
    try:
        yield job, device_name
    except BaseException as error:
        job.announce_failure(error)
        raise
    finally:
        stop(job)


def wrap(model: torch.nn.Module, job: Distributed, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (with SyncBatchNorm on CUDA); ``model`` itself for one process."""
    if not job.active:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return torch.nn.parallel.DistributedDataParallel(model)


def _attempt_store(store: dist.Store, rank: int, world: int) -> dist.Store:
    """The namespace of the job's store that this attempt's ranks, and no other, share.

    ``torchrun``'s agent serves one store for the whole job, restarts included, and what a killed attempt wrote stays
    in it, among others each rank's gloo address. A restarted rank that looked its peer up before the peer had
    written again read the dead attempt's address: gloo then connected to a closed port ("Connection refused"), or,
    having judged from the stale address that the peer would call, both sides waited for each other for 5 x the
    process group's timeout. Prefixing keys with the restart count would not do: each node's agent counts its own.
    So rank 0 names a fresh namespace and gives it to each rank in answer to a fresh token of that rank's: no key a
    rank waits for can predate the attempt.
    """
    if rank == 0:
        namespace = _welcome_ranks(store, world)
    else:
        token = uuid.uuid4().hex
        store.set(f"medxai/hello {rank}", token)
        _wait_for_key(store, f"medxai/welcome {token}", JOIN_TIMEOUT)
        namespace = store.get(f"medxai/welcome {token}").decode()
        store.set(f"medxai/{namespace}/joined {rank}", "")
    return dist.PrefixStore(f"medxai/{namespace}/", store)


def _welcome_ranks(store: dist.Store, world: int) -> str:
    """Rank 0's side of :func:`_attempt_store`: a fresh namespace, given to every token of every other rank until
    each has joined it (a token left by a dead attempt is answered too; nobody waits for that answer)."""
    namespace = uuid.uuid4().hex
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world))
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    pauses = _pauses()
    while True:
        for rank in sorted(waiting):
            if store.check([f"medxai/{namespace}/joined {rank}"]):
                waiting.discard(rank)
            elif store.check([f"medxai/hello {rank}"]):
                token = store.get(f"medxai/hello {rank}")
                if answered.get(rank) != token:
                    store.set(f"medxai/welcome {token.decode()}", namespace)
                    answered[rank] = token
        if not waiting:
            return namespace
        if time.monotonic() > deadline:
            raise DistributedError(f"rank(s) {sorted(waiting)} did not join the job within {JOIN_TIMEOUT}")
        time.sleep(next(pauses))


def _wait_for_key(store: dist.Store, key: str, timeout: datetime.timedelta, *, watch_failures: bool = False) -> None:
    """Poll ``store`` until ``key`` is set (the store's own ``wait`` logs a warning at every timed-out poll).

    Raises:
        DistributedError: ``timeout`` passed, or (``watch_failures``) a rank announced that it failed.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    for pause in _pauses():
        if store.check([key]):
            return
        if watch_failures and store.check([_FAILED]):
            raise DistributedError(f"stopped waiting for the other ranks: {store.get(_FAILED).decode()}")
        if time.monotonic() > deadline:
            raise DistributedError(f"waited {timeout} for the other ranks ({key!r}) in vain")
        time.sleep(pause)


def _pauses() -> Iterator[float]:
    """Poll intervals: 10 ms at first (a barrier after a quick step passes at once), growing to 1 s (a wait of hours
    costs the store one look a second)."""
    pause = 0.01
    while True:
        yield pause
        pause = min(pause * 1.5, 1.0)


def _die_with_agent() -> None:
    """Under ``torchrun`` on Linux, have the kernel kill this worker when its agent dies.

    ``torchrun`` starts each worker in a session of its own, so a signal to ``torchrun``'s process group (a CI
    runner's timeout, ``kill -9`` of the agent) never reaches the workers: they would train on, orphaned, holding
    their memory. ``PR_SET_PDEATHSIG`` asks the kernel for SIGKILL when the parent goes; an agent that went just
    before the request (the parent changed between the two looks) is reported instead. (One that went earlier,
    while this worker was importing, is not seen here; on one machine its store went with it, and joining fails.)

    Raises:
        DistributedError: the agent is already gone.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("could not tie this worker's life to torchrun's agent (prctl: errno %d)", ctypes.get_errno())
        return
    if os.getppid() != agent:
        raise DistributedError("torchrun's agent ended before this worker started: not training without it")
