"""DDP training under torchrun (2 CPU processes, gloo on loopback): the batches the ranks share, the gathered
validation logits, a whole run equal to a single-process run within tolerance, and an elastic restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medxai.data.prepared import batch_order
from medxai.run_folder import RunFolder
from medxai.train.distributed import Distributed

TORCHRUN = Path(sys.executable).with_name("torchrun")
# Short real runs: PneumoniaMNIST, no augmentation or dropout (their random draws differ between one process and
# two by design), so what remains is BatchNorm's per-rank statistics on the CPU and the order of float sums.
TRAIN_ARGS = ["--preset", "demo", "--set", "augment.enabled=false", "--set", "model.dropout=0",
              "--set", "train.bootstrap_resamples=20", "--set", "explain.per_outcome=1"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MEDXAI_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}


def _torchrun(out: Path, name: str, *extra: str) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *extra, "-m", "medxai", "train", *TRAIN_ARGS,
            "--out", str(out), "--name", name]


@pytest.mark.parametrize("count,batch,world", [(10, 4, 2), (9, 4, 2), (12, 6, 3), (7, 8, 1)])
def test_the_ranks_batches_of_a_step_are_the_single_process_batch(count, batch, world):
    generator = torch.Generator().manual_seed(3)
    single = batch_order(count, batch, shuffle=True, generator=torch.Generator().manual_seed(3))
    per_rank = [batch_order(count, batch, shuffle=True, generator=generator.manual_seed(3), rank=rank, world=world)
                for rank in range(world)]
    padded = -(-count // world) * world
    assert all(len(batches) == -(-padded // batch) for batches in per_rank)
    for step, expected in enumerate(single):
        together = torch.cat([batches[step] for batches in per_rank])
        # Each rank the same share of every step; together the single-process batch (plus the padding).
        assert len({len(batches[step]) for batches in per_rank}) == 1
        assert set(expected.tolist()) <= set(together.tolist())
    covered = torch.cat([torch.cat(batches) for batches in per_rank])
    assert len(covered) == padded and set(covered.tolist()) == set(range(count))


def test_the_batch_must_divide_by_the_processes():
    from medxai.errors import DataError

    with pytest.raises(DataError, match="divide by the number of processes 4"):
        batch_order(10, 6, shuffle=False, world=4)


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job = Distributed(rank, world)
        batches = batch_order(11, 4, shuffle=False, rank=rank, world=world)
        positions = torch.cat(batches)
        rows = torch.stack([positions.float() * 10, positions.float() + 0.5], dim=1)  # row i holds (10 i, i + .5)
        gathered = job.gather_rows(rows, positions, 11)
        totals = job.sum(torch.tensor([float(rank + 1)], dtype=torch.float64))
        torch.save({"gathered": gathered, "totals": totals}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_validation_logits_gathered_from_two_gloo_processes_are_in_input_order(tmp_path):
    from torch.distributed.elastic.utils.distributed import get_free_port

    mp.spawn(_gather_worker, args=(2, get_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = torch.stack([torch.arange(11.0) * 10, torch.arange(11.0) + 0.5], dim=1)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(result["gathered"], expected)
        assert result["totals"].item() == 3.0


def test_two_gloo_processes_train_the_run_a_single_process_trains(data_dir, tmp_path):
    out = tmp_path / "runs"
    common = ["--epochs", "2"]
    single = subprocess.run([sys.executable, "-m", "medxai", "train", *TRAIN_ARGS, *common, "--out", str(out),
                             "--name", "single"], env=_env(tmp_path), capture_output=True, text=True, timeout=400, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([*_torchrun(out, "ddp"), *common], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=400, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = RunFolder(out / "single"), RunFolder(out / "ddp")
    # Rank 0 alone wrote: the same files, and the metrics table printed once.
    assert _layout(one.path) == _layout(two.path)
    assert ddp.stdout.count("run folder:") == 1
    # The same global batches, step by step: the per-epoch figures agree closely (measured: val AUC within 1e-3,
    # losses within 0.01), though BatchNorm normalises each rank's half of a batch on its own on the CPU.
    for a, b in zip(one.read_history(), two.read_history(), strict=True):
        assert abs(a["val_score"] - b["val_score"]) < 0.005
        assert abs(a["val_loss"] - b["val_loss"]) < 0.03
        assert abs(a["train_loss"] - b["train_loss"]) < 0.03
        assert a["lr"] == b["lr"]  # the same number of steps: the schedule is where it would be
    metrics_one, metrics_two = one.read_metrics(), two.read_metrics()
    for split in ("val", "test"):
        assert metrics_one[split]["n"] == metrics_two[split]["n"]
        assert abs(metrics_one[split]["auc"] - metrics_two[split]["auc"]) < 0.01


def _layout(folder: Path) -> list[str]:
    """The files of a run folder, gallery heatmaps counted rather than named (they name the images chosen)."""
    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    heatmaps = sum(name.startswith("heatmaps/") for name in files)
    return sorted(name for name in files if not name.startswith("heatmaps/")) + [f"{heatmaps} heatmaps"]


def _worker_pids(root: psutil.Process) -> list[psutil.Process]:
    return [child for child in root.children(recursive=True)
            if "medxai" in " ".join(child.cmdline()) and child.pid != root.pid and _rank(child) is not None]


def _rank(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("RANK")
    except (psutil.Error, OSError):
        return None


def _kill_rank_one_after_the_first_checkpoint(out: Path, tmp_path: Path) -> tuple[int, str] | None:
    """Run the 3-epoch torchrun job, SIGKILL rank 1 once the first checkpoint exists, and return torchrun's exit code
    and output; None when it does not finish within 300 s (its whole process group is killed then)."""
    # Two restarts allowed: a restarted gloo group sometimes fails to connect its mesh once ("Connection refused"
    # to a port of the killed attempt); the next restart connects.
    command = [*_torchrun(out, "elastic", "--max-restarts", "2"), "--epochs", "3"]
    process = subprocess.Popen(command, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    state = out / "elastic" / "checkpoints" / "state.json"
    deadline = time.monotonic() + 240
    try:
        while not state.is_file() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert state.is_file(), "no checkpoint appeared"
        victims = [child for child in _worker_pids(psutil.Process(process.pid)) if _rank(child) == "1"]
        assert victims, "no rank-1 worker found"
        victims[0].kill()
        output, _ = process.communicate(timeout=300)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        return None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()


def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_last_checkpoint(data_dir, tmp_path):
    # One job in five hung after the restart on this 2-core machine (a gloo mesh that did not connect, waiting out
    # the process group's timeout; see the issue 11 note): a hung attempt is killed and the scenario run once more.
    outcome = None
    for attempt in range(2):
        out = tmp_path / f"runs{attempt}"
        outcome = _kill_rank_one_after_the_first_checkpoint(out, tmp_path)
        if outcome is not None:
            break
    assert outcome is not None, "torchrun hung after the restart twice"
    code, output = outcome
    assert code == 0, output[-3000:]
    assert "resuming" in output and "from its last checkpoint" in output
    history = RunFolder(out / "elastic").read_history()
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0]  # every epoch once, none repeated or lost
    assert (out / "elastic" / "report.html").is_file()
