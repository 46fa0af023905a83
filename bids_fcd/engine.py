"""The training engine: one fold's loop with early stopping, checkpoints, resume, DDP and autoencoder
pre-training.

`fit` trains one model on one fold (or, without validation samples, the final refit) and leaves in its folder
`log.tsv`, `checkpoint_best.pt` (lowest validation loss) and `checkpoint_latest.pt` (weights, optimizer,
scheduler, epoch, RNG states: what a resume needs; `torch.load(weights_only=True)` reads it). The loss is the
subject-level BCE plus `voxel_loss_weight` x (BCE on every voxel-supervised volume + soft Dice on patients
with a lesion mask); controls count as voxel-supervised with an empty map, patients without a mask train only
the subject head.

Multi-GPU / multi-node: run under torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK; `DistContext.from_env`
joins the process group and `fit` wraps the model in DistributedDataParallel (gradients averaged by DDP), each
rank taking every world-th volume of the epoch's permutation:

    torchrun --nproc_per_node=4 run.py BIDS_DIR OUTPUT_DIR group --device cuda
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 run.py ... group

The group orchestration (data, folds, thresholds, evaluation, outputs) is `bids_fcd.train.run_group`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bids_fcd.config import ModelConfig
from bids_fcd.data import (
    BatchAugmentation,
    EpochBatches,
    ResidentSamples,
    Sample,
    TorchIOAugmentation,
    VolumeDataset,
    sample_seed,
)
from bids_fcd.derivatives import atomic_path
from bids_fcd.evaluate import auroc, subject_metrics

log = logging.getLogger("bids_fcd.engine")

GRAD_CLIP_NORM = 5.0
PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each costs a device sync)
DICE_EPS = 1.0
LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_subject_loss", "train_voxel_loss", "val_loss",
               "val_subject_loss", "val_voxel_loss", "val_auroc", "val_balanced_accuracy", "seconds",
               "volumes_per_s", "best")


@dataclass(frozen=True)
class TrainOptions:
    """Training hyper-parameters (the group-level command-line options)."""

    epochs: int = 30
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 1
    grad_accum_steps: int = 1
    patience: int = 10
    mixed_precision: str = "off"  # "off", "bf16" or "fp16"
    deterministic: bool = False
    augmentation: str = "auto"  # "auto" (gpu on CUDA, cpu otherwise), "cpu" (TorchIO), "gpu" (batched), "off"
    # 10, not 1: on a toy cohort with an obvious FLAIR blob (32^3, 40 epochs, lr 3e-3) weight 1 never learned
    # the map (val Dice 0.01, AUROC 0.64: the subject head fitted other cues); 10 did (Dice 0.88, AUROC 1.0;
    # at lr 1e-3 Dice 0.49, AUROC 1.0).
    voxel_loss_weight: float = 10.0
    pretrain_epochs: int = 0
    # share of the training participants that also train as a copy with a non-FCD mimic (`data.mimic_copies`,
    # made before `fit`); here so that resume and the model's record see it
    mimic_fraction: float = 0.0
    # share of the training controls that also train as a copy with a simulated FCD lesion (`data.implant_copies`)
    implant_fraction: float = 0.0
    seed: int = 0
    n_workers: int = 0  # DataLoader worker processes (CPU augmentation runs in them)

    def signature(self) -> dict:
        """What decides the result of training (resume only continues a run with the same)."""
        values = asdict(self)
        values.pop("n_workers")
        return values


@dataclass
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 without one) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, else gloo)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            # Long timeout: rank 0 may preprocess missing participants while the others wait.
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                          timeout=timedelta(hours=6))
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device)

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def close(self) -> None:
        """Destroy the process group before the process exits: a gloo process that leaves it to interpreter
        shutdown can abort with SIGABRT as its worker threads release tensors (pytorch/pytorch#179291)."""
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank (decisions such as early stopping must agree)."""
        if not self.active:
            return value
        holder = [value]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(model: nn.Module, dist: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` (already on dist.device) when running under torchrun."""
    if not dist.active:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch and numpy; in deterministic mode ask for deterministic kernels (warn where none exist)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


# --- loss ---------------------------------------------------------------------------------------------------


def fcd_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], pos_weight: float,
             voxel_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, subject, voxel) loss of a batch (module docstring); voxel terms are averaged in the brain."""
    subject_logits = outputs["subject_logits"].float()  # (N,)
    subject = F.binary_cross_entropy_with_logits(
        subject_logits, batch["label"], pos_weight=torch.tensor(pos_weight, device=subject_logits.device))
    voxel_logits = outputs["voxel_logits"].float()  # (N, 1, X, Y, Z)
    mask, lesion = batch["brain_mask"], batch["lesion"]
    supervised = batch["voxel_target"]
    voxel = voxel_logits.sum() * 0.0  # keeps the graph (DDP) when the batch has no voxel target
    if supervised.any():
        bce = F.binary_cross_entropy_with_logits(voxel_logits, lesion, reduction="none") * mask
        bce = bce.sum(dim=(1, 2, 3, 4)) / mask.sum(dim=(1, 2, 3, 4)).clamp(min=1)  # (N,)
        voxel = voxel + bce[supervised].mean()
    with_lesion = batch["has_lesion"]
    if with_lesion.any():
        prob = torch.sigmoid(voxel_logits) * mask
        intersection = (prob * lesion).sum(dim=(1, 2, 3, 4))
        soft_dice = (2 * intersection + DICE_EPS) / (prob.sum(dim=(1, 2, 3, 4)) + lesion.sum(dim=(1, 2, 3, 4))
                                                     + DICE_EPS)
        voxel = voxel + (1 - soft_dice[with_lesion]).mean()
    return subject + voxel_weight * voxel, subject, voxel


def positive_weight(samples: list[Sample]) -> float:
    """BCE weight of FCD cases: controls / patients, so both classes weigh the same."""
    labels = np.array([s.label for s in samples])
    return float((labels == 0).sum() / max(1, (labels == 1).sum()))


# --- schedule and checkpoints -------------------------------------------------------------------------------


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the peak learning rate, then cosine decay to 0 (per optimizer step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and normalisation parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=options.learning_rate)


def run_signature(config: ModelConfig, options: TrainOptions, train_ids: list[str], val_ids: list[str],
                  epochs: int, start_digest: str | None = None) -> str:
    """Hash of everything a resumed run must share with the interrupted one (`train_ids`, `val_ids`: `sample_ids`;
    `start_digest`: the weights a fine-tune started from; a run from scratch has none)."""
    blob = json.dumps({"config": {k: v for k, v in json.loads(config.to_json()).items()
                                  if k not in ("training", "versions")},
                       "options": options.signature(), "epochs": epochs, "train": train_ids, "val": val_ids,
                       **({"start": start_digest} if start_digest else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_ids(samples: list[Sample]) -> list[str]:
    """Each sample's name, label and a fingerprint of its arrays (every 7th voxel of image, brain mask and lesion):
    a resume must train on the same data, not only on the same names (a corrected lesion mask, another draw of
    synthetic volumes under the same names). A strided view keeps this cheap for hundreds of whole volumes."""
    ids = []
    for sample in samples:
        digest = hashlib.sha256()
        for array in (sample.image, sample.brain_mask, sample.lesion):
            if array is not None:
                digest.update(np.ascontiguousarray(array[..., ::7, ::7, ::7]).tobytes())
        ids.append(f"{sample.unit.name}:{sample.unit.label}:{digest.hexdigest()[:12]}")
    return ids


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of a model's weights: what a fine-tune started from, so that a resume never continues a run that
    started from other weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_state(path: Path, state: dict) -> None:
    """torch.save through a temporary file and rename: an interruption never leaves half a checkpoint."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_state(path: Path, device: torch.device) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint means starting over, not failing
        log.warning("%s unreadable (%s): starting this fold over", path, err)
        return None


# --- the loop -----------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    best_epoch: int
    history: list[dict]
    best_path: Path | None


def augmentation_for(options: TrainOptions, device: torch.device, spacing_mm: float):
    """(per-volume CPU transform or None, batch GPU augmentation or None) for `options.augmentation`."""
    choice = options.augmentation
    if choice == "auto":
        choice = "gpu" if device.type == "cuda" else "cpu"
    if choice == "cpu":
        return TorchIOAugmentation(spacing_mm), None
    if choice == "gpu":
        return None, BatchAugmentation(spacing_mm)
    return None, None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def iterate_batches(samples: list[Sample], batches: EpochBatches, transform, options: TrainOptions,
                    device: torch.device,
                    resident: ResidentSamples | None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches on `device`: from `resident` samples when given, else from a DataLoader whose workers run
    the per-volume CPU `transform` (TorchIO)."""
    if resident is not None:
        for keys in batches:
            yield resident.batch([index for index, _ in keys])
        return
    loader = DataLoader(VolumeDataset(samples, transform), batch_sampler=batches,
                        num_workers=options.n_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield to_device(batch, device)


def augment_batch(augmentation: BatchAugmentation | None, batch: dict[str, torch.Tensor],
                  *seed_keys: int) -> dict[str, torch.Tensor]:
    """The batch through the GPU-path augmentation, its parameters drawn from a generator seeded by
    `seed_keys` (seed, fold, epoch, step, rank): replayable, and independent of any global RNG."""
    if augmentation is None:
        return batch
    generator = torch.Generator().manual_seed(sample_seed(*seed_keys))
    params = augmentation.sample(generator, batch["image"].shape[0], batch["image"].shape[1])
    image, mask, lesion = augmentation.apply(batch["image"], batch["brain_mask"], batch["lesion"], params)
    return {**batch, "image": image, "brain_mask": mask, "lesion": lesion}


def autocast(options: TrainOptions, device: torch.device):
    if options.mixed_precision == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if options.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class EpochRunner:
    """One fold's model, optimizer, schedule and data: `train_epoch` and `validate`."""

    def __init__(self, model: nn.Module, train_samples: list[Sample], options: TrainOptions,
                 dist: DistContext, spacing_mm: float, fold_id: int, epochs: int):
        self.model = wrap_model(model.to(dist.device), dist)
        self.train_samples = train_samples
        self.options = options
        self.dist = dist
        self.fold_id = fold_id
        self.pos_weight = positive_weight(train_samples)
        self.cpu_transform, self.gpu_augmentation = augmentation_for(options, dist.device, spacing_mm)
        self.resident = None if self.cpu_transform else ResidentSamples(train_samples, dist.device)
        self.val_resident: ResidentSamples | None = None
        self.optimizer = make_optimizer(unwrap(self.model), options)
        steps = self.steps_per_epoch()
        self.scheduler = cosine_with_warmup(self.optimizer, options.warmup_epochs * steps, epochs * steps)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=options.mixed_precision == "fp16")

    def batches(self, epoch: int) -> EpochBatches:
        return EpochBatches(len(self.train_samples), self.options.batch_size, self.options.seed, self.fold_id,
                            epoch,
                            rank=self.dist.rank, world=self.dist.world)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.batches(0)) / self.options.grad_accum_steps)

    def augment(self, batch: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, torch.Tensor]:
        return augment_batch(self.gpu_augmentation, batch, self.options.seed, self.fold_id, epoch, step,
                             self.dist.rank)

    def train_epoch(self, epoch: int, desc: str) -> dict[str, float]:
        """One pass over this rank's share of the training samples; mean losses and throughput."""
        model, options = self.model, self.options
        model.train()
        batches = self.batches(epoch)
        stream = iterate_batches(self.train_samples, batches, self.cpu_transform, options, self.dist.device,
                                 self.resident)
        totals = torch.zeros(3, device=self.dist.device)  # summed on the device: no sync per step
        n_volumes, started = 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        progress = tqdm(stream, total=len(batches), desc=desc, leave=False,
                        disable=None if self.dist.is_main else True)
        for step, batch in enumerate(progress):
            batch = self.augment(batch, epoch, step)
            last_micro = (step + 1) % options.grad_accum_steps == 0 or step + 1 == len(batches)
            sync = contextlib.nullcontext() if last_micro or not self.dist.active else model.no_sync()
            with sync:
                with autocast(options, self.dist.device):
                    outputs = model(batch["image"], batch["brain_mask"] > 0.5)
                losses = fcd_loss(outputs, batch, self.pos_weight, options.voxel_loss_weight)
                self.scaler.scale(losses[0] / options.grad_accum_steps).backward()
            if last_micro:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            size = batch["image"].shape[0]
            totals += torch.stack([loss.detach().float() for loss in losses]) * size
            n_volumes += size
            if step % PROGRESS_EVERY == 0:
                progress.set_postfix(loss=f"{float(totals[0]) / n_volumes:.4f}")
        # plain floats: the history goes into weights-only checkpoints
        mean = (totals / max(1, n_volumes)).tolist()
        seconds = time.perf_counter() - started
        return {"train_loss": mean[0], "train_subject_loss": mean[1], "train_voxel_loss": mean[2],
                "seconds": seconds, "volumes_per_s": n_volumes * self.dist.world / seconds}

    @torch.no_grad()
    def validate(self, samples: list[Sample]) -> dict[str, float]:
        """Losses, AUROC and balanced accuracy (at 0.5) on `samples`, without augmentation, in eval mode."""
        model = unwrap(self.model)
        if self.dist.active:  # every rank evaluates rank 0's batch-norm statistics
            for buffer in model.buffers():
                torch_dist.broadcast(buffer, 0)
        model.eval()
        if self.val_resident is None:
            self.val_resident = ResidentSamples(samples, self.dist.device)
        batches = EpochBatches(len(samples), self.options.batch_size, 0, 0, 0, shuffle=False)
        totals, probs, labels = np.zeros(3), [], []
        for batch in iterate_batches(samples, batches, None, self.options, self.dist.device,
                                     self.val_resident):
            with autocast(self.options, self.dist.device):
                outputs = model(batch["image"], batch["brain_mask"] > 0.5)
            losses = fcd_loss(outputs, batch, self.pos_weight, self.options.voxel_loss_weight)
            totals += np.array([loss.item() for loss in losses]) * batch["image"].shape[0]
            probs.extend(torch.sigmoid(outputs["subject_logits"].float()).tolist())
            labels.extend(batch["label"].tolist())
        mean = (totals / len(samples)).tolist()
        metrics = subject_metrics(np.array(labels), np.array(probs), 0.5)
        return {"val_loss": mean[0], "val_subject_loss": mean[1], "val_voxel_loss": mean[2],
                "val_auroc": auroc(np.array(labels), np.array(probs)),
                "val_balanced_accuracy": metrics["balanced_accuracy"]}

    def state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def load(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.dist.device)


def write_log(path: Path, history: list[dict]) -> None:
    """The fold's training log, one row per epoch (LOG_COLUMNS; empty where not measured)."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                             for k, v in row.items()})


def end_of_epoch(out_dir: Path, state: dict) -> None:
    """Save `checkpoint_latest.pt`; the seam where an interruption is simulated in tests."""
    save_state(out_dir / "checkpoint_latest.pt", state)


def fit(model: nn.Module, config: ModelConfig, train_samples: list[Sample], val_samples: list[Sample],
        options: TrainOptions, out_dir: Path, fold_id: int, dist: DistContext,
        epochs: int | None = None, start_digest: str | None = None) -> FitResult:
    """Train `model` (in place) on one fold, resuming from `out_dir/checkpoint_latest.pt` when it matches.

    A fine-tune passes `start_digest` (`state_digest` of the weights it loaded): a resume then needs the same
    starting weights too. A run from scratch passes none and resumes whatever its fresh initialisation.

    With validation samples: early stopping on the validation loss (`options.patience` epochs without a new
    minimum), `checkpoint_best.pt` at the minimum. Without (the final refit): exactly `epochs` epochs.
    `model` ends with the last epoch's weights; the best are in `checkpoint_best.pt`.
    """
    from bids_fcd.models import save_checkpoint

    epochs = epochs or options.epochs
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = EpochRunner(model, train_samples, options, dist, config.grid_spacing_mm, fold_id, epochs)
    signature = run_signature(config, options, sample_ids(train_samples), sample_ids(val_samples), epochs,
                              start_digest)
    history: list[dict] = []
    best_loss, best_epoch, bad_epochs, start = math.inf, 0, 0, 1
    finished = False
    state = load_state(out_dir / "checkpoint_latest.pt", dist.device)
    if state is not None and state.get("signature") == signature:
        runner.load(state)
        history, best_loss = list(state["history"]), state["best_loss"]
        best_epoch, bad_epochs, start, finished = (state["best_epoch"], state["bad_epochs"],
                                                   state["epoch"] + 1,
                                                   state["finished"])
        log.info("%s: resuming after epoch %d of %d", out_dir.name, state["epoch"], epochs)
    elif state is not None:
        log.warning("%s: checkpoint_latest.pt is from a run with other settings or participants: "
                    "starting over", out_dir.name)
    best_path = out_dir / "checkpoint_best.pt" if val_samples else None
    for epoch in range(start, epochs + 1):
        if finished:
            break
        row = {"epoch": epoch, "lr": runner.optimizer.param_groups[0]["lr"],
               **runner.train_epoch(epoch, f"{out_dir.name} epoch {epoch}/{epochs}")}
        if val_samples:
            row.update(runner.validate(val_samples))
            row = dist.broadcast(row)
            row["best"] = row["val_loss"] < best_loss
            if row["best"]:
                best_loss, best_epoch, bad_epochs = row["val_loss"], epoch, 0
                if dist.is_main:
                    save_checkpoint(unwrap(runner.model), config.updated(
                        training={"fold": fold_id, "epoch": epoch, "val_loss": best_loss}), best_path)
            else:
                bad_epochs += 1
            finished = bad_epochs >= options.patience
        else:
            best_epoch = epoch
        finished = finished or epoch == epochs
        history.append(row)
        log.info("%s epoch %d/%d: %s", out_dir.name, epoch, epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
        if dist.is_main:
            write_log(out_dir / "log.tsv", history)
            end_of_epoch(out_dir, {
                "state_dict": unwrap(runner.model).state_dict(), "config_json": config.to_json(),
                **runner.state(), "epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch,
                "bad_epochs": bad_epochs, "history": history, "signature": signature, "finished": finished})
        dist.barrier()
        if finished and val_samples and bad_epochs >= options.patience:
            log.info("%s: early stop at epoch %d (best %d, val_loss %.4f)", out_dir.name, epoch, best_epoch,
                     best_loss)
    return FitResult(best_epoch=best_epoch, history=history, best_path=best_path)


# --- autoencoder pre-training (seeds 002 and 004) -----------------------------------------------------------


class AutoEncoder(nn.Module):
    """The pre-training autoencoder: the model's encoder and a decoder from its deepest map (stride 16).

    No skip connections (as ClinicaDL's autoencoder): the deep features must carry the image themselves.
    forward(x (N, C, X, Y, Z)) -> reconstruction (N, C, X, Y, Z).
    """

    def __init__(self, encoder: nn.Module, c_out: int, width: int = 16):
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        channels = encoder.channels[-1]
        for _ in range(4):  # stride 16 -> 1
            layers += [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                       nn.Conv3d(channels, width, 3, padding=1, bias=False), nn.BatchNorm3d(width), nn.ReLU()]
            channels = width
        layers.append(nn.Conv3d(width, c_out, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[-1])


def pretrain_encoder(model: nn.Module, samples: list[Sample], options: TrainOptions, dist: DistContext,
                     spacing_mm: float, fold_id: int, out_path: Path) -> None:
    """Autoencoder pre-training of `model.encoder` on `samples` (labels unused): MSE in the brain.

    The encoder's weights are stored in `out_path` and reused when it exists (resume).
    """
    encoder = model.encoder
    if out_path.is_file():
        encoder.load_state_dict(torch.load(out_path, map_location="cpu", weights_only=True))
        log.info("%s: pre-trained encoder reused", out_path)
        return
    autoencoder = AutoEncoder(encoder, len(samples[0].image)).to(dist.device)
    wrapped = wrap_model(autoencoder, dist)
    optimizer = make_optimizer(autoencoder, options)
    transform, gpu_augmentation = augmentation_for(options, dist.device, spacing_mm)
    resident = None if transform else ResidentSamples(samples, dist.device)
    stream = 1000 + fold_id  # seeds apart from the fold's supervised training
    for epoch in range(1, options.pretrain_epochs + 1):
        autoencoder.train()
        batches = EpochBatches(len(samples), options.batch_size, options.seed, stream, epoch,
                               rank=dist.rank, world=dist.world)
        total = 0.0
        for step, batch in enumerate(iterate_batches(samples, batches, transform, options, dist.device,
                                                     resident)):
            batch = augment_batch(gpu_augmentation, batch, options.seed, stream, epoch, step, dist.rank)
            image, mask = batch["image"], batch["brain_mask"]
            with autocast(options, dist.device):
                output = wrapped(image)
            loss = (((output.float() - image) ** 2) * mask).sum() / (mask.sum() * image.shape[1]).clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        log.info("autoencoder pre-training (%s) epoch %d/%d: reconstruction MSE %.4f", out_path.parent.name,
                 epoch, options.pretrain_epochs, total / max(1, len(batches)))
    if dist.is_main:
        save_state(out_path, {k: v.detach().cpu() for k, v in encoder.state_dict().items()})
    dist.barrier()
