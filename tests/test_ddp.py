"""DDP correctness on CPU (gloo, 127.0.0.1): disjoint data per rank and worker, no hang with one
shard, all-dropped batches without find_unused_parameters, metrics reduced across ranks.

The 2-rank run starts this file as a script, once per rank (``LOCAL_RANK`` set: Lightning joins
the processes instead of launching them).
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from stacks import STACK_DUMP_SIGNAL, dump_stacks
from torch.utils.data import DataLoader

from nested.data import DomainSpec, build_stream, collate_batch

REPO = Path(__file__).resolve().parents[1]
DEMO_SHARD = REPO / "data" / "demo" / "faces" / "faces-000000.tar"
# Sample indices of the 13-sample shard: the second of reader 1 (rank 0, worker 1; samples 3:6) and of
# reader 2 (rank 1, worker 0; samples 6:9), each reached by an epoch's 2 draws in shard order.
CORRUPT = (4, 7)
ADAMW_1E3 = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}


def _demo_samples() -> list[dict[str, bytes | str]]:
    samples: dict[str, dict] = {}
    with tarfile.open(DEMO_SHARD) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def _write(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- one rank (script)


def _two_rank_trainer(max_steps: int, callbacks: list):
    """A quiet DDP trainer of two CPU ranks, each started as its own process (``LOCAL_RANK`` set)."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def run_rank(out: Path, shard: str, model: str) -> None:
    """One rank of a 2-rank DDP fit: 1 shard, 2 workers per rank, every subject dropped."""
    import lightning as L

    from nested.data import NestedDataModule
    from nested.encoder import EncoderSpec
    from nested.training.module import ConditioningDropout, NestedAttentionModule

    class Record(L.Callback):
        def __init__(self) -> None:
            self.batches: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches.append(
                {
                    "epoch": trainer.current_epoch,
                    "keys": list(batch["keys"]),
                    "corrupt": int(batch["skipped"]["corrupt"]),
                    "loss": float(outputs["loss"]),
                }
            )

    L.seed_everything(0, verbose=False)
    spec = EncoderSpec(backbone=f"{model}/image_encoder", num_tokens=4, width=32, depth=1, heads=2)
    module = NestedAttentionModule(
        model, spec, dropout=ConditioningDropout(text=0.0, image=1.0, both=0.0), optimizer=ADAMW_1E3
    )
    data = NestedDataModule(
        [DomainSpec("faces", shard, "<person>")],
        resolution=64,
        reference_size=32,
        batch_size=2,
        num_workers=2,
        epoch_samples=8,  # 2 samples per reader per epoch: one batch per worker
        shuffle_buffer=1,  # each reader's 3-4 samples in shard order: no resampled repeat within an epoch
        open_shards=1,
    )
    record = Record()
    trainer = _two_rank_trainer(4, [record])
    module.configure_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=data)
    after = module.state_dict()
    result = {
        "rank": trainer.global_rank,
        "batches": record.batches,
        "find_unused_parameters": bool(trainer.strategy._ddp_kwargs.get("find_unused_parameters", False)),
        "moved": sorted(k for k in after if not torch.equal(after[k], before[k])),
        "checksum": float(sum(v.double().sum() for v in after.values())),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    _shut_down()


def run_divergence_rank(out: Path) -> None:
    """One rank of a 2-rank DDP fit of a tiny regression under DivergenceGuard(max_consecutive_skips=1): at
    step 3 only rank 1's gradients hold a NaN, put there after DDP's all-reduce (as a sharded strategy's
    would be); from step 5 on every loss is NaN, so step 6 ends the fit on both ranks."""
    from test_divergence import Recorder, Regression

    from nested.callbacks.divergence import DivergenceGuard
    from nested.errors import DivergenceError

    class OneRankBroken(Regression):
        def on_after_backward(self) -> None:
            if self.global_step + 1 == 3 and self.global_rank == 1:
                self.layer.weight.grad[0, 0] = float("nan")

    recorder = Recorder()
    trainer = _two_rank_trainer(10, [DivergenceGuard(max_consecutive_skips=1), recorder])
    try:
        trainer.fit(OneRankBroken(dict.fromkeys(range(5, 20), float("nan"))))
        error = None
    except DivergenceError as stopped:
        error = str(stopped)
    weights = {step: value.tolist() for step, value in recorder.weights.items()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"error": error, "weights": weights}))
    _shut_down()


def _shut_down() -> None:
    """Wait for the other rank, then destroy the process group before this rank exits: left to interpreter
    exit, or destroyed while the other rank still talks to it, gloo's threads can abort the process
    ("terminate called without an active exception", seen under load)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cpu_fsdp_strategy():
    """configs/strategy/fsdp.yaml's FSDPStrategy, made to run on CPU (test-only shims).

    Lightning refuses ``type(strategy) is FSDPStrategy`` with ``accelerator="cpu"`` and passes
    ``device_id=None`` on CPU, which torch's FSDP rejects; and a full state dict with
    ``offload_to_cpu=True`` of CPU-resident shards crashes (it frees what it then clones). None
    of this applies on GPUs.
    """
    import lightning.fabric.strategies.fsdp as fabric_fsdp
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp
    import yaml
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def full_state_dict_context(module, world_size, rank0_only=True):
        return FSDP.state_dict_type(
            module=module,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    fabric_fsdp._get_full_state_dict_context = full_state_dict_context
    pytorch_fsdp._get_full_state_dict_context = full_state_dict_context

    class CpuFSDPStrategy(pytorch_fsdp.FSDPStrategy):
        def _setup_model(self, model):
            kwargs = dict(
                self.kwargs, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu")
            )
            return super()._setup_model(FSDP(model, **kwargs))

    preset = yaml.safe_load((REPO / "configs" / "strategy" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    return CpuFSDPStrategy(**preset["init_args"])


def run_fsdp_rank(out: Path, model: str) -> None:
    """One rank of a 2-rank FSDP fit of 3 steps that writes a checkpoint at every step."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nested.data import NestedDataModule
    from nested.encoder import EncoderSpec
    from nested.training.module import NestedAttentionModule
    from nested.training.resume import AtomicCheckpointIO

    L.seed_everything(0, verbose=False)
    spec = EncoderSpec(backbone=f"{model}/image_encoder", num_tokens=4, width=32, depth=1, heads=2)
    # The placeholder embedding trains too: FSDP replaces the registered parameters with views of its flat
    # parameter, which the text encoder's embedding hook must follow.
    module = NestedAttentionModule(model, spec, train_token_embeddings=True, optimizer=ADAMW_1E3)
    data = NestedDataModule(
        [DomainSpec("faces", str(REPO / "data/demo/faces/shards.json"), "<person>")],
        resolution=64,
        reference_size=32,
        batch_size=2,
        num_workers=0,
        epoch_samples=8,
        shuffle_buffer=4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=cpu_fsdp_strategy(),
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=data)
    wrapped = trainer.strategy.model
    result = {
        "wrapper": type(wrapped).__name__,
        "local_numel": sum(p.numel() for p in wrapped.parameters()),
        "frozen_in_tree": any("unet" in name for name, _ in wrapped.named_parameters()),
    }
    (out / f"fsdp-rank{trainer.global_rank}.json").write_text(json.dumps(result))
    _shut_down()


# ----------------------------------------------------------------------------- tests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(arguments: list[str], logs: list[Path], timeout: float = 150.0) -> None:
    """Runs this file as a script once per rank, joined over gloo on 127.0.0.1; fails with both logs
    if a rank fails, and with every process's Python stacks (ranks and their DataLoader workers) if
    the run hangs."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "RANK"))
    }
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0", OMP_NUM_THREADS="1")
    processes = []
    try:
        for rank, path in enumerate(logs):
            with open(path, "w") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, __file__, *arguments],
                        env={**env, "LOCAL_RANK": str(rank)},
                        stdout=log,
                        stderr=log,
                    )
                )
        deadline = time.monotonic() + timeout
        for process in processes:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, "\n".join(path.read_text()[-3000:] for path in logs)
    except subprocess.TimeoutExpired:
        dump_stacks([process.pid for process in processes])
        pytest.fail("the 2-rank run hung:\n" + "\n".join(path.read_text()[-12000:] for path in logs))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def test_two_ranks_one_shard_disjoint_no_hang_all_dropped_and_reduced_metrics(tiny_sd_path, tmp_path):
    samples = _demo_samples()[:13]
    for index in CORRUPT:
        samples[index] = {
            "__key__": samples[index]["__key__"],
            "jpg": b"not a jpeg",
            "json": samples[index]["json"],
        }
    shard = _write(tmp_path / "one.tar", samples)  # no shards.json: counted from the tar headers
    _run_two_ranks(
        [str(tmp_path), str(shard), str(tiny_sd_path)], [tmp_path / f"rank{r}.log" for r in range(2)]
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # All-dropped batches trained under DDP without find_unused_parameters; ranks stayed in sync.
    assert not ranks[0]["find_unused_parameters"]
    assert ranks[0]["moved"] and ranks[0]["moved"] == ranks[1]["moved"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]

    # 1 shard, 2 ranks x 2 workers: each reader takes a quarter of its samples; no hang, nothing shared.
    seen = [{k for b in r["batches"] for k in b["keys"]} for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    for epoch in (0, 1):
        keys = [k for r in ranks for b in r["batches"] if b["epoch"] == epoch for k in b["keys"]]
        assert len(keys) == 8 and len(set(keys)) == 8, f"epoch {epoch}: a sample was read twice: {keys}"
    assert not {samples[i]["__key__"] for i in CORRUPT} & (seen[0] | seen[1])

    # Metrics are reduced across ranks: the skip counter is the sum, the loss the mean.
    assert all(sum(b["corrupt"] for b in r["batches"]) > 0 for r in ranks), "both ranks skip a corrupt sample"
    last_epoch = [sum(b["corrupt"] for b in r["batches"] if b["epoch"] == 1) for r in ranks]
    assert ranks[0]["metrics"]["data/skipped_corrupt"] == sum(last_epoch)
    last_losses = [r["batches"][-1]["loss"] for r in ranks]
    assert ranks[0]["metrics"]["train/loss"] == pytest.approx(sum(last_losses) / 2, rel=1e-5)


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    samples = _demo_samples()
    shards = [str(_write(tmp_path / f"s{i}.tar", samples[4 * i : 4 * i + 4])) for i in range(4)]
    spec = DomainSpec("faces", shards, "<person>")
    per_rank = []
    for rank in range(2):
        stream = build_stream(
            [spec],
            train=True,
            resolution=16,
            reference_size=8,
            rank=rank,
            world_size=2,
            num_workers=2,
            batch_size=2,
            epoch_samples=32,
            shuffle_buffer=4,
        )
        batches = list(DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_batch))
        assert len(batches) == len(stream) // 2 == 8
        per_worker = [{k for b in batches[w::2] for k in b["keys"]} for w in range(2)]
        assert per_worker[0] and per_worker[1] and not per_worker[0] & per_worker[1]
        per_rank.append(per_worker[0] | per_worker[1])
    assert not per_rank[0] & per_rank[1]  # reader g reads shard g only (4 shards, 4 readers)


def test_too_few_samples_for_every_reader_fail_at_start(tmp_path):
    shard = _write(tmp_path / "tiny.tar", _demo_samples()[:3])
    spec = DomainSpec("faces", str(shard), "<person>")
    with pytest.raises(ValueError, match=r"3 samples in 1 shard\(s\) cannot feed 4 readers"):
        build_stream([spec], train=True, resolution=16, rank=0, world_size=2, num_workers=2)


def test_fsdp_preset_shards_only_the_adapter_and_writes_full_checkpoints(tiny_sd_path, tmp_path):
    _run_two_ranks(["fsdp", str(tmp_path), str(tiny_sd_path)], [tmp_path / f"fsdp{r}.log" for r in range(2)])
    ranks = [json.loads((tmp_path / f"fsdp-rank{r}.json").read_text()) for r in range(2)]
    (path,) = (tmp_path / "checkpoints").glob("*step=3.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    total = sum(v.numel() for v in checkpoint["state_dict"].values())
    assert all(r["wrapper"] == "FullyShardedDataParallel" and not r["frozen_in_tree"] for r in ranks)
    assert [r["local_numel"] for r in ranks] == [total // 2] * 2  # each rank holds half the adapter
    assert checkpoint["global_step"] == 3 and all(k.startswith("adapter.") for k in checkpoint["state_dict"])
    assert len(checkpoint["NestedDataModule"]["ranks"]) == 2  # both ranks' stream positions
    assert checkpoint["optimizer_states"][0]["state"]  # the full AdamW state, gathered
    (first,) = (tmp_path / "checkpoints").glob("*step=1.ckpt")
    key = "adapter.token_embeddings.text_encoder:<person>"
    assert not torch.equal(
        torch.load(first, weights_only=True)["state_dict"][key], checkpoint["state_dict"][key]
    )


def test_ranks_agree_to_skip_a_step_only_one_of_them_sees_non_finite_and_stop_together(tmp_path):
    _run_two_ranks(["divergence", str(tmp_path)], [tmp_path / "rank0.log", tmp_path / "rank1.log"])
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        weights = {int(step): value for step, value in result["weights"].items()}
        assert weights[3] == weights[2] and weights[5] == weights[4] and weights[4] != weights[3]
        assert max(weights) == 5  # step 6 raised
        assert result["error"].startswith(
            "training diverged: the gradients were not finite (NaN or infinite) at 2 optimizer steps in a row, "
            "steps 5 to 6; the weights are those of step 4"
        )
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_fsdp_preset_composes_with_a_config(capsys, monkeypatch):
    # Here: this file is also each DDP rank's script, which needs none of test_cli.
    from test_cli import printed_config

    monkeypatch.chdir(REPO)
    strategy = printed_config(capsys, "configs/strategy/fsdp.yaml")["trainer"]["strategy"]
    assert (
        strategy["class_path"].endswith("FSDPStrategy") and strategy["init_args"]["state_dict_type"] == "full"
    )


if __name__ == "__main__":
    # A hung run's stacks, this process's and (inherited through fork) its DataLoader workers'.
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)
    if sys.argv[1] == "fsdp":
        run_fsdp_rank(Path(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "divergence":
        run_divergence_rank(Path(sys.argv[2]))
    else:
        run_rank(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
