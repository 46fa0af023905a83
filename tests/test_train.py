"""The training engine: loss masking, schedule, checkpoints, early stopping, exact resume, DDP on gloo."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from bids_fcd import engine
from bids_fcd.models import build_model, load_checkpoint
from tests.group_factory import TINY_CONFIG, one_torch_thread, tiny_samples

OPTIONS = engine.TrainOptions(epochs=3, batch_size=2, learning_rate=1e-3, patience=10, augmentation="cpu",
                              deterministic=True, seed=3)

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY_CONFIG)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def loss_batch() -> dict[str, torch.Tensor]:
    """Three volumes: a control, a patient with a lesion mask, a patient without one."""
    shape = (3, 1, 8, 8, 8)
    lesion = torch.zeros(shape)
    lesion[1, 0, 2:4, 2:4, 2:4] = 1
    return {"label": torch.tensor([0.0, 1.0, 1.0]), "brain_mask": torch.ones(shape), "lesion": lesion,
            "voxel_target": torch.tensor([True, True, False]), "has_lesion": torch.tensor([False, True,
                                                                                           False])}


def test_voxel_loss_ignores_patients_without_a_mask():
    batch = loss_batch()
    voxel_logits = torch.zeros(3, 1, 8, 8, 8, requires_grad=True)
    outputs = {"voxel_logits": voxel_logits, "subject_logits": torch.zeros(3)}
    _, _, voxel = engine.fcd_loss(outputs, batch, pos_weight=1.0, voxel_weight=1.0)
    voxel.backward()
    grad = voxel_logits.grad
    assert grad[2].abs().sum() == 0  # the unmasked patient: no voxel supervision
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    # control: BCE towards 0 everywhere (all gradients positive at logit 0)
    assert torch.all(grad[0] > 0)


def test_subject_loss_is_weighted_bce():
    batch = loss_batch()
    outputs = {"voxel_logits": torch.zeros(3, 1, 8, 8, 8), "subject_logits": torch.tensor([0.5, -1.0, 2.0])}
    _, subject, _ = engine.fcd_loss(outputs, batch, pos_weight=2.0, voxel_weight=1.0)
    expected = nn.functional.binary_cross_entropy_with_logits(outputs["subject_logits"], batch["label"],
                                                              pos_weight=torch.tensor(2.0))
    assert subject == pytest.approx(float(expected))


def test_cosine_schedule_warms_up_then_decays():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = engine.cosine_with_warmup(optimizer, warmup_steps=4, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == sorted(rates[:5]) and rates[4] == pytest.approx(1.0)
    assert rates[4:] == sorted(rates[4:], reverse=True) and rates[-1] < 0.05


def test_fit_writes_log_and_checkpoints_readable_with_weights_only(tmp_path):
    samples = tiny_samples(6)
    result = engine.fit(tiny_model(), TINY_CONFIG, samples[:4], samples[4:], replace(OPTIONS, epochs=2),
                        tmp_path, 0, engine.DistContext())
    assert len(result.history) == 2 and result.best_path == tmp_path / "checkpoint_best.pt"
    latest = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert latest["epoch"] == 2 and latest["finished"] and "optimizer" in latest and "scheduler" in latest
    _, config = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert config.grid_shape == TINY_CONFIG.grid_shape and config.training["fold"] == 0
    header = (tmp_path / "log.tsv").read_text().splitlines()[0].split("\t")
    assert header == list(engine.LOG_COLUMNS)


def test_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    losses = iter([1.0, 0.8, 0.9, 0.95, 0.7])

    def scripted(self, samples):
        return {"val_loss": next(losses), "val_subject_loss": 0.0, "val_voxel_loss": 0.0, "val_auroc": 0.5,
                "val_balanced_accuracy": 0.5}

    monkeypatch.setattr(engine.EpochRunner, "validate", scripted)
    samples = tiny_samples(4)
    result = engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:],
                        replace(OPTIONS, epochs=5, patience=2, augmentation="off"), tmp_path, 0,
                        engine.DistContext())
    assert result.best_epoch == 2 and len(result.history) == 4
    assert load_checkpoint(tmp_path / "checkpoint_best.pt")[1].training["epoch"] == 2


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    samples = tiny_samples(6)
    uninterrupted = tiny_model()
    full = engine.fit(uninterrupted, TINY_CONFIG, samples[:4], samples[4:], OPTIONS, tmp_path / "full", 0,
                      engine.DistContext())

    save = engine.end_of_epoch

    def interrupt_after_epoch_2(out_dir: Path, state: dict) -> None:
        save(out_dir, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(engine, "end_of_epoch", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(tiny_model(), TINY_CONFIG, samples[:4], samples[4:], OPTIONS, tmp_path / "resumed", 0,
                   engine.DistContext())
    monkeypatch.setattr(engine, "end_of_epoch", save)
    assert torch.load(tmp_path / "resumed" / "checkpoint_latest.pt", weights_only=True)["epoch"] == 2

    resumed_model = tiny_model(seed=99)  # initial weights do not matter: they come from the checkpoint
    resumed = engine.fit(resumed_model, TINY_CONFIG, samples[:4], samples[4:], OPTIONS, tmp_path / "resumed",
                         0,
                         engine.DistContext())
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert torch.equal(flat(resumed_model), flat(uninterrupted))
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]


def test_a_finished_fold_is_not_trained_again(tmp_path, monkeypatch):
    samples = tiny_samples(4)
    options = replace(OPTIONS, epochs=1, augmentation="off")
    engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0,
               engine.DistContext())
    monkeypatch.setattr(engine.EpochRunner, "train_epoch", lambda *a: pytest.fail("trained again"))
    result = engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0,
                        engine.DistContext())
    assert len(result.history) == 1


def test_a_fine_tune_from_other_weights_starts_over(tmp_path, monkeypatch):
    samples = tiny_samples(4)
    options = replace(OPTIONS, epochs=2, augmentation="off")
    start = tiny_model(seed=1).state_dict()
    save = engine.end_of_epoch

    def interrupt_after_epoch_1(out_dir: Path, state: dict) -> None:
        save(out_dir, state)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(engine, "end_of_epoch", interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(tiny_model(seed=1), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0,
                   engine.DistContext(), start_digest=engine.state_digest(start))
    monkeypatch.setattr(engine, "end_of_epoch", save)
    trained_epochs = []
    train_epoch = engine.EpochRunner.train_epoch
    monkeypatch.setattr(engine.EpochRunner, "train_epoch",
                        lambda runner, epoch, *a: trained_epochs.append(epoch) or train_epoch(runner, epoch, *a))
    other_digest = engine.state_digest(tiny_model(seed=2).state_dict())
    assert other_digest != engine.state_digest(start)
    engine.fit(tiny_model(seed=2), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0,
               engine.DistContext(), start_digest=other_digest)
    assert trained_epochs == [1, 2]  # started over: not resumed after epoch 1
    trained_epochs.clear()
    engine.fit(tiny_model(seed=2), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0,
               engine.DistContext(), start_digest=other_digest)
    assert trained_epochs == []  # the same start: the finished run is kept


def test_group_training_tells_fit_the_weights_it_started_from(tmp_path, monkeypatch):
    from bids_fcd import train

    passed = []
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: passed.append(kwargs["start_digest"]))
    start = tiny_model(seed=1).state_dict()
    for state in (start, None):
        train.train_one(TINY_CONFIG, state, [], [], OPTIONS, tmp_path, 0, engine.DistContext())
    assert passed == [engine.state_digest(start), None]


def test_other_settings_start_over(tmp_path):
    samples = tiny_samples(4)
    options = replace(OPTIONS, epochs=1, augmentation="off")
    engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0,
               engine.DistContext())
    result = engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:], replace(options,
                                                                                     learning_rate=0.01),
                        tmp_path, 0, engine.DistContext())
    assert len(result.history) == 1
    state = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert state["signature"] == engine.run_signature(TINY_CONFIG, replace(options, learning_rate=0.01),
                                                      engine.sample_ids(samples[:2]), engine.sample_ids(samples[2:]), 1)


def test_same_names_with_other_data_start_over(tmp_path, caplog):
    samples = tiny_samples(4)
    options = replace(OPTIONS, epochs=1, augmentation="off")
    engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0, engine.DistContext())
    with caplog.at_level(logging.INFO, logger="bids_fcd.engine"):
        engine.fit(tiny_model(), TINY_CONFIG, samples[:2], samples[2:], options, tmp_path, 0, engine.DistContext())
    assert "resuming after epoch 1" in caplog.text and "starting over" not in caplog.text
    caplog.clear()
    changed = replace(samples[0], image=samples[0].image + 0.5)  # same participant name, other intensities
    with caplog.at_level(logging.INFO, logger="bids_fcd.engine"):
        engine.fit(tiny_model(), TINY_CONFIG, [changed, samples[1]], samples[2:], options, tmp_path, 0,
                   engine.DistContext())
    assert "starting over" in caplog.text and "resuming" not in caplog.text


def test_gpu_augmentation_path_and_bf16_autocast_run_on_cpu(tmp_path):
    samples = tiny_samples(4)
    options = replace(OPTIONS, epochs=1, augmentation="gpu", mixed_precision="bf16", deterministic=False,
                      grad_accum_steps=2)
    result = engine.fit(tiny_model(), TINY_CONFIG, samples, [], options, tmp_path, 4, engine.DistContext())
    assert result.best_path is None and np.isfinite(result.history[0]["train_loss"])


def test_gradient_accumulation_steps_the_optimizer_once_per_group_of_batches(tmp_path, monkeypatch):
    """4 volumes in batches of 1 with grad_accum_steps=2 and 3: 2 optimizer steps each (the last group may be
    short), and the schedule counts optimizer steps, not batches."""
    steps = []
    original = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    for accumulate, expected in ((1, 4), (2, 2), (3, 2)):
        steps.clear()
        options = replace(OPTIONS, epochs=1, batch_size=1, augmentation="off", grad_accum_steps=accumulate)
        engine.fit(tiny_model(), TINY_CONFIG, tiny_samples(4), [], options, tmp_path / str(accumulate), 4,
                   engine.DistContext())
        assert len(steps) == expected, accumulate


def test_deterministic_mode_asks_for_deterministic_kernels():
    try:
        engine.set_determinism(3, True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        first = torch.rand(3)
        engine.set_determinism(3, True)
        assert torch.equal(torch.rand(3), first)
    finally:
        engine.set_determinism(0, False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_autoencoder_pretraining_changes_and_stores_the_encoder(tmp_path):
    samples = tiny_samples(4)
    model = tiny_model()
    before = flat(model.encoder).clone()
    path = tmp_path / "pretrained_encoder.pt"
    engine.pretrain_encoder(model, samples, replace(OPTIONS, pretrain_epochs=1, augmentation="off"),
                            engine.DistContext(), 6.0, 0, path)
    assert not torch.equal(flat(model.encoder), before)
    reused = tiny_model()
    engine.pretrain_encoder(reused, samples, replace(OPTIONS, pretrain_epochs=1), engine.DistContext(), 6.0,
                            0, path)
    assert torch.equal(flat(reused.encoder), flat(model.encoder))


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the 2-process gloo job (module level, so that spawn can pickle it)."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        context = engine.DistContext(rank, world, torch.device("cpu"))
        torch.manual_seed(0)
        linear = engine.wrap_model(nn.Linear(4, 1), context)
        linear(torch.full((2, 4), float(rank + 1))).sum().backward()  # local d/dW = 2 (rank + 1)
        torch.save(linear.module.weight.grad.clone(), Path(out_dir) / f"grad-{rank}.pt")

        samples = tiny_samples(6)
        model = tiny_model()
        options = replace(OPTIONS, epochs=2, batch_size=1, augmentation="gpu", deterministic=False)
        engine.fit(model, TINY_CONFIG, samples[:4], samples[4:], options, Path(out_dir) / "fold-0", 0,
                   context)
        torch.save(flat(model), Path(out_dir) / f"weights-{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_ddp_on_gloo_averages_gradients_and_keeps_ranks_identical(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.allclose(torch.load(tmp_path / f"grad-{rank}.pt"), torch.full((1, 4),
                                                                                   3.0))  # mean of 2, 4
    assert torch.equal(torch.load(tmp_path / "weights-0.pt"), torch.load(tmp_path / "weights-1.pt"))
    assert not torch.equal(torch.load(tmp_path / "weights-0.pt"), flat(tiny_model()))
    assert (tmp_path / "fold-0" / "checkpoint_best.pt").is_file()  # written once, by rank 0


def group_args(tmp_path: Path, *extra: str):
    from bids_fcd import cli

    (tmp_path / "bids").mkdir(exist_ok=True)
    return cli.build_parser().parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "group", *extra])


def test_starting_point_takes_the_models_grid_and_weights(tmp_path):
    from bids_fcd.models import save_checkpoint
    from bids_fcd.train import starting_point

    model = tiny_model(seed=4)
    save_checkpoint(model, TINY_CONFIG, tmp_path / "start.pt")
    config, state = starting_point(group_args(tmp_path, "--model", str(tmp_path / "start.pt")))
    assert config.grid_shape == (32, 32, 32) and config.arch_params == {"width": 0.25}
    assert torch.equal(state["voxel_head.weight"], model.state_dict()["voxel_head.weight"])


def test_an_ensemble_starting_model_starts_the_group_level_from_its_first_member(tmp_path):
    from bids_fcd.models import ensemble_of, save_checkpoint
    from bids_fcd.train import starting_point

    first, second = tiny_model(seed=4), tiny_model(seed=5)
    save_checkpoint(first, TINY_CONFIG, tmp_path / "first.pt")
    save_checkpoint(second, TINY_CONFIG, tmp_path / "second.pt")
    save_checkpoint(*ensemble_of([tmp_path / "first.pt", tmp_path / "second.pt"]), tmp_path / "start.pt")
    config, state = starting_point(group_args(tmp_path, "--model", str(tmp_path / "start.pt")))
    assert config.ensemble_size == 1
    build_model(config).load_state_dict(state)  # one network's weights, loadable as the group level loads them
    assert torch.equal(state["voxel_head.weight"], first.state_dict()["voxel_head.weight"])


def test_registry_architecture_and_grid_overrides_start_from_scratch(tmp_path):
    from bids_fcd.models import save_checkpoint
    from bids_fcd.train import starting_point

    save_checkpoint(tiny_model(), TINY_CONFIG, tmp_path / "start.pt")
    overrides = ["--architecture", "resnet3d_18", "--grid_shape", "48x48x48", "--grid_spacing_mm", "4"]
    config, state = starting_point(group_args(tmp_path, "--model", str(tmp_path / "start.pt"), *overrides))
    assert state is None and config.architecture == "resnet3d_18" and config.arch_params == {}
    assert config.grid_shape == (48, 48, 48) and config.grid_spacing_mm == 4.0
    build_model(config)  # the registry knows it
    _, state = starting_point(group_args(tmp_path, "--model", str(tmp_path / "start.pt"), "--from_scratch"))
    assert state is None


def test_engine_learns_an_obvious_lesion(tmp_path):
    """End-to-end learning check: a bright 3^3 FLAIR blob per patient must end up under the voxel map's peak
    and drive the subject score (weight 1 on the voxel loss failed this; see TrainOptions)."""
    samples = tiny_samples(40, seed=2)
    rng = np.random.default_rng(0)
    for sample in samples:
        sample.image = sample.image.copy()
        if sample.label == 1:
            inside = np.argwhere(sample.brain_mask[4:-8, 4:-8, 4:-8]) + 4
            x, y, z = inside[rng.integers(len(inside))]
            lesion = np.zeros(sample.brain_mask.shape, np.float16)
            lesion[x:x + 3, y:y + 3, z:z + 3] = 1
            sample.lesion = lesion * sample.brain_mask
            sample.image[1][sample.lesion > 0] += 1.5
    train, val = samples[:30], samples[30:]
    model = tiny_model()
    options = replace(OPTIONS, epochs=30, batch_size=4, learning_rate=3e-3, augmentation="off", patience=30)
    result = engine.fit(model, TINY_CONFIG, train, val, options, tmp_path, 0, engine.DistContext())
    assert result.history[-1]["val_auroc"] >= 0.9
    model.eval()
    with torch.no_grad():
        for sample in (s for s in val if s.label == 1):
            out = model(torch.from_numpy(sample.image)[None], torch.from_numpy(sample.brain_mask)[None, None])
            peak = int(out["voxel_logits"][0, 0].flatten().argmax())
            assert sample.lesion.flatten()[peak] > 0


TORCHRUN_PROBE = """
import json, pathlib, sys, torch
from bids_fcd.engine import DistContext
context = DistContext.from_env(torch.device("cpu"))
decision = context.broadcast({"stop_after": 3} if context.rank == 0 else None)
context.barrier()
context.close()
report = {"rank": context.rank, "world": context.world, "active": context.active, "decision": decision,
          "closed": not torch.distributed.is_initialized()}
pathlib.Path(sys.argv[1], f"rank{context.rank}.json").write_text(json.dumps(report))
"""


def test_torchrun_processes_join_one_gloo_group_from_the_environment(tmp_path):
    """The documented multi-process entry (torchrun sets WORLD_SIZE, RANK, MASTER_ADDR ...): each process joins
    the group through `DistContext.from_env`, and rank 0's decisions reach the other."""
    script = tmp_path / "probe.py"
    script.write_text(TORCHRUN_PROBE)
    # --standalone: a local rendezvous on a free port (a fixed port could be taken, port 0 hangs)
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                               check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[:3000]  # the start names the rank's own error
    # one file per rank: the two processes' stdout lines can interleave
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world"], r["active"]) for r in reports] == [(0, 2, True), (1, 2, True)]
    assert all(r["decision"] == {"stop_after": 3} and r["closed"] for r in reports)
