"""The training engine on the CPU at small scale: every preset's code path, AMP, resume, DDP, failures."""

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frcnn_tutorial import engine
from frcnn_tutorial.data import make_embedded_dataset
from frcnn_tutorial.train import (
    PRESETS,
    build_scheduler,
    load_model,
    lr_factor,
    make_config,
    parse_args,
    processes_to_launch,
    train,
)
from frcnn_tutorial.utils import free_local_port

ROOT = Path(__file__).resolve().parent.parent
# Tiny images, two steps, evaluation on the 4 "val" images: each run takes a few seconds.
FAST = dict(max_iters=2, batch_size=2, train_images=0, min_size=96, max_size=128, progress=False, log_every=1,
            workers=0, test_split="val", extra={"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A small embedded dataset (VOC layout) that every test here trains on."""
    root = tmp_path_factory.mktemp("data")
    make_embedded_dataset(root / "embedded", seed=1, num_train=12, num_val=4, num_test=6)
    return root


def run(tmp_path, data_root, preset="embedded-cpu", **overrides):
    cfg = make_config(preset, **{**FAST, "dataset": "embedded", "data_root": str(data_root),
                                 "out": str(tmp_path / "run"), **overrides})
    return train(cfg), Path(cfg.out)


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, data_root) -> tuple[dict, Path]:
    """One short embedded-cpu run shared by the tests that only read its results."""
    return run(tmp_path_factory.mktemp("embedded"), data_root, max_iters=3, test_split="test")


def test_embedded_cpu_writes_every_artefact(embedded_run):
    metrics, out = embedded_run
    for name in ("last.pt", "log.csv", "curves.png", "metrics.json"):
        assert (out / name).is_file(), f"{name} missing"
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("mAP", "ap", "metric", "train_time_s", "images_per_s", "preset", "iterations"):
        assert key in saved
    assert saved["iterations"] == 3 and saved["preset"] == "embedded-cpu" and saved["metric"] == "area"
    assert 0.0 <= saved["mAP"] <= 1.0 and saved == json.loads(json.dumps(metrics))
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step") and "loss_objectness" in rows[0] and "mAP" in rows[0]
    assert len(rows) == 1 + 3 + 1  # header, a row per step (log_every=1), the final evaluation


def test_load_model_rebuilds_the_trained_model(embedded_run, data_root):
    from frcnn_tutorial.data import embedded_dataset

    _, out = embedded_run
    model, cfg, classes = load_model(out / "last.pt")
    assert not model.training and cfg.preset == "embedded-cpu"
    assert cfg.lr_steps == make_config().lr_steps  # a tuple again (a list in the JSON)
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    test_set = embedded_dataset("test", root=data_root / "embedded")
    assert engine.evaluate(model, test_set, progress=False)["mAP"] == pytest.approx(embedded_run[0]["mAP"])


def test_train_images_draws_a_larger_split_beside_the_default(tmp_path, data_root):
    """train_images=N draws its own embedded set (folder embedded-N); its test split is the default one's."""
    from frcnn_tutorial.train import build_datasets

    cfg = make_config("embedded-cpu", **{**FAST, "data_root": str(tmp_path), "train_images": 16})
    train_set, test_set, classes = build_datasets(cfg)
    assert len(train_set) == 16 and (tmp_path / "embedded-16" / "VOCdevkit").is_dir()
    default = make_embedded_dataset(tmp_path / "embedded", num_train=2, num_test=1)
    from frcnn_tutorial.data import embedded_dataset

    same = embedded_dataset(cfg.test_split, root=default)
    assert len(same) == len(test_set) and torch.equal(same[5][1]["boxes"], test_set[5][1]["boxes"])
    assert parse_args(["--lr-steps", "1.5,1.8"]).lr_steps == (1.5, 1.8)  # fractions of an epoch are allowed


def test_train_or_reuse_trains_once_per_config(tmp_path, data_root, capsys):
    """A finished run with the same config is reused untouched; a run that differs in what it trains is redone."""
    from frcnn_tutorial.train import train_or_reuse

    cfg = make_config("embedded-cpu", **{**FAST, "data_root": str(data_root), "out": str(tmp_path / "run")})
    first = train_or_reuse(cfg)
    written = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    again = train_or_reuse(dataclasses.replace(cfg, log_every=5, progress=True))  # only how it reports differs
    assert again == json.loads(json.dumps(first)) and "reusing" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == written
    longer = train_or_reuse(dataclasses.replace(cfg, max_iters=3))
    assert longer["iterations"] == 3 and "another config (max_iters" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["tiny", "tiny_roipool"])
def test_single_scale_tiny_models_train_through_the_engine(tmp_path, data_root, model):
    """Chapters 04 and 05 train the tiny trunk without a pyramid, with RoIAlign or RoIPool, through train()."""
    from frcnn_tutorial.pooling import MultiScaleRoIAlign, SingleScaleRoIPool

    metrics, out = run(tmp_path, data_root, model=model)
    detector, cfg, _ = load_model(out / "last.pt")
    assert cfg.model == model and metrics["iterations"] == 2 and list(detector.backbone(torch.zeros(1, 3, 64, 64)))
    pooler = detector.roi_heads.box_roi_pool
    assert isinstance(pooler, SingleScaleRoIPool if model == "tiny_roipool" else MultiScaleRoIAlign)


def test_multi_scale_preset_trains_resumes_and_reloads(tmp_path, data_root):
    """min_size as several sizes (the embedded-cpu preset's multi-scale training): from the command line, through a
    checkpoint (JSON makes the tuple a list) and --resume, back to a model that evaluates at the last size."""
    preset = PRESETS["embedded-cpu"]
    assert isinstance(preset["min_size"], tuple) and len(preset["min_size"]) > 1
    assert parse_args(["--min-size", "96,112,128"]).min_size == (96, 112, 128)
    assert parse_args(["--min-size", "600"]).min_size == (600,)
    metrics, out = run(tmp_path, data_root, min_size=(96, 128), extra=preset["extra"])
    model, cfg, _ = load_model(out / "last.pt")
    assert cfg.min_size == (96, 128) and model.transform.min_size == (96, 128)
    assert model.backbone.out_channels == preset["extra"]["fpn_channels"]
    assert model.roi_heads.box_roi_pool.sampling_ratio == preset["extra"]["sampling_ratio"] == 1
    assert model.rpn_feature_names == ["1", "2", "3", "pool"] and preset["extra"]["rpn_on_p2"] is False
    assert isinstance(model.backbone.fpn.layer_blocks[0][0], torch.nn.Identity)  # p2_output_conv=False
    test_min_size = preset["extra"].get("test_min_size")
    assert model.transform.choose_min_size() == (test_min_size or 128)  # eval: the preset's test size or the last
    resumed, _ = run(tmp_path, data_root, min_size=(96, 128), extra=preset["extra"], max_iters=3, resume=True)
    assert resumed["iterations"] == 3


def test_model_options_that_do_not_fit_are_refused_clearly(tmp_path, data_root):
    with pytest.raises(SystemExit, match="model tiny has no FPN and does not take fpn_channels "):
        run(tmp_path, data_root, model="tiny", extra={"fpn_channels": 32})
    every_option = "fpn_channels, p2_output_conv, rpn_on_p2, sampling_ratio"
    with pytest.raises(SystemExit, match=rf"tiny_roipool .* does not take {every_option}"):
        run(tmp_path, data_root, model="tiny_roipool", extra=PRESETS["embedded-cpu"]["extra"])
    with pytest.raises(SystemExit, match="--sync-bn needs CUDA"):
        run(tmp_path, data_root, sync_bn=True, device="cpu")


def test_course_runs_share_one_folder_per_model_and_profile():
    from frcnn_tutorial.train import build_model, course_config

    full, ci = course_config("tiny_fpn", "full"), course_config("tiny_fpn", "ci")
    assert Path(full.out).name == "course_tiny_fpn_full" and Path(ci.out).name == "course_tiny_fpn_ci"
    assert (full.model, full.train_images, full.min_size, full.epochs) == ("tiny_fpn", 0, 256, 4)
    # the chapters compare the builders' own models: not the preset's 32-channel, multi-scale variant
    for profile in ("full", "ci"):
        for model in ("tiny_fpn", "tiny", "tiny_roipool"):
            cfg = course_config(model, profile)
            assert cfg.extra == {} and isinstance(cfg.min_size, int)
            assert (cfg.lr, cfg.lr_schedule) == (2e-3, "step")  # what the chapters' numbers were measured with
            assert build_model(cfg, num_classes=7).backbone.out_channels == 64
    assert ci.max_iters == 30 and course_config("tiny_roipool", "ci").model == "tiny_roipool"
    with pytest.raises(ValueError, match="course runs exist for"):
        course_config("vgg16")


@pytest.mark.parametrize("preset", ["voc07-vgg16", "voc0712-r50fpn", "voc0712-r50fpn-finetune"])
def test_voc_presets_code_path_on_embedded_data(tmp_path, data_root, preset):
    """The VOC presets' models and optimisers, on tiny images, without downloading any weights."""
    metrics, out = run(tmp_path, data_root, preset=preset, weights="none", max_iters=1, batch_size=1,
                       metric=PRESETS[preset]["metric"])
    assert metrics["iterations"] == 1 and metrics["metric"] == "voc07"
    model, cfg, classes = load_model(out / "last.pt")
    assert cfg.model == PRESETS[preset]["model"] and len(classes) >= 5


def test_amp_on_cpu_uses_bfloat16_and_trains(tmp_path, data_root):
    metrics, _ = run(tmp_path, data_root, amp=True)
    assert metrics["iterations"] == 2
    with engine.autocast_context(torch.device("cpu"), amp=True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_resume_equals_an_uninterrupted_run(tmp_path, data_root):
    """4 steps straight vs 2 steps, stop, resume to 4: same weights, optimiser state and step (batch 4 of 12
    images: 3 steps per epoch, so the resumed run finishes epoch 1 mid-way and starts epoch 2). Multi-scale and a
    cosine schedule: the sizes and the lr of a step depend on the step alone."""
    common = dict(max_iters=4, batch_size=4, checkpoint_every=1, hflip=0.5, seed=3, min_size=(80, 96, 112),
                  lr_schedule="cosine", epochs=2)
    run(tmp_path / "straight", data_root, **common)
    run(tmp_path / "split", data_root, **{**common, "max_iters": 2})
    run(tmp_path / "split", data_root, **common, resume=True)
    straight = torch.load(tmp_path / "straight/run/last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "split/run/last.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), f"{key} differs after resume"
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["scheduler"] == resumed["scheduler"]
    with open(tmp_path / "split/run/log.csv", newline="") as f:
        logged = [float(row["step"]) for row in csv.DictReader(f) if row["loss"]]
    assert logged == [1, 2, 3, 4]  # no step logged twice


def test_cosine_schedule_warms_up_then_falls_to_zero_at_the_last_epoch():
    cfg = make_config("embedded-cpu", lr_schedule="cosine", epochs=2, warmup_iters=0)
    assert [round(lr_factor(s, cfg, 10), 6) for s in (0, 10, 20, 30)] == [1.0, 0.5, 0.0, 0.0]
    assert lr_factor(5, dataclasses.replace(cfg, max_iters=10), 10) == lr_factor(5, cfg, 10)  # stops, not squeezed
    warm = dataclasses.replace(cfg, warmup_iters=4, warmup_factor=0.0)
    assert lr_factor(2, warm, 10) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    params = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear': use step or cosine"):
        build_scheduler(dataclasses.replace(cfg, lr_schedule="linear"), torch.optim.SGD(params, lr=1.0), 10)


def test_resume_refuses_a_different_config_and_names_the_fields(tmp_path, data_root, embedded_run):
    _, done = embedded_run
    (tmp_path / "run").mkdir()
    shutil.copy(done / "last.pt", tmp_path / "run" / "last.pt")
    with pytest.raises(SystemExit, match=r"lr: checkpoint has 0.004, this run has 0.5"):
        run(tmp_path, data_root, max_iters=4, lr=0.5, resume=True, test_split="test")
    metrics, _ = run(tmp_path, data_root, max_iters=4, epochs=20, resume=True, test_split="test")  # longer: allowed
    assert metrics["iterations"] == 4


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(engine.CheckpointError, match="refused to load"):
        engine.load_checkpoint(path)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    engine.save_checkpoint(path, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(path, {"step": 2})
    assert engine.load_checkpoint(path)["step"] == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    from frcnn_tutorial import train as train_module

    real_build = train_module.build_model

    def poisoned(cfg, num_classes):
        model = real_build(cfg, num_classes)
        forward, calls = model.forward, {"n": 0}

        def forward_with_nan(images, targets=None):
            losses = forward(images, targets)
            calls["n"] += 1
            if model.training and calls["n"] == 3:
                losses["loss_classifier"] = losses["loss_classifier"] * float("nan")
            return losses

        model.forward = forward_with_nan
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned)
    with pytest.raises(SystemExit, match=r"not finite at step 2.*last finite losses: loss_objectness="):
        run(tmp_path, data_root, max_iters=5, checkpoint_every=1)
    kept = engine.load_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["step"] == 2


def test_missing_voc_says_how_to_download(tmp_path):
    cfg = make_config("voc07-vgg16", data_root=str(tmp_path), out=str(tmp_path / "out"), weights="none")
    with pytest.raises(SystemExit, match=r"python -m frcnn_tutorial.data.voc --download"):
        train(cfg)


def test_empty_dataset_says_what_to_do(tmp_path):
    make_embedded_dataset(tmp_path / "empty" / "embedded", seed=0, num_train=0, num_val=1, num_test=1)
    cfg = make_config("embedded-cpu", **{**FAST, "data_root": str(tmp_path / "empty"), "out": str(tmp_path / "o")})
    with pytest.raises(SystemExit, match=r"empty split.*ImageSets/Main"):
        train(cfg)


def test_command_line_overrides_every_field():
    cfg = parse_args(["--preset", "voc0712-r50fpn", "--max-iters", "7", "--batch-size", "8", "--lr", "0.01",
                      "--epochs", "3", "--device", "cpu", "--data-root", "/x", "--amp", "true",
                      "--lr-steps", "2,3", "--extra", '{"box_score_thresh": 0.01}'])
    assert (cfg.max_iters, cfg.batch_size, cfg.lr, cfg.epochs, cfg.device, cfg.data_root, cfg.amp) == \
        (7, 8, 0.01, 3, "cpu", "/x", True)
    assert cfg.lr_steps == (2, 3) and cfg.extra == {"box_score_thresh": 0.01} and cfg.model == "resnet50_fpn"
    with pytest.raises(SystemExit):
        parse_args(["--amp", "maybe"])
    bare = parse_args(["--resume", "--amp", "--progress", "false"])
    assert bare.resume is True and bare.amp is True and bare.progress is False
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("voc2099")


def test_two_process_ddp_with_gloo_keeps_ranks_identical(tmp_path, data_root):
    out = tmp_path / "ddp"
    port = str(free_local_port())  # two test runs at once must not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "frcnn_tutorial.train", "--preset", "embedded-cpu", "--data-root", str(data_root),
           "--train-images", "0", "--out", str(out), "--max-iters", "3", "--batch-size", "4", "--min-size", "80,96,112",
           "--max-size", "128",
           "--progress", "false", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 3
    first, second = metrics["weights_checksums"]
    assert first == second, "the two processes ended with different weights"


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def _batches(monkeypatch, rank_, world, group_ids, batch_size=2, epoch=3):
    monkeypatch.setattr(engine, "rank", lambda: rank_)
    monkeypatch.setattr(engine, "world_size", lambda: world)
    loader = engine.make_train_loader(_Indices(50), batch_size, seed=5, epoch=epoch, group_ids=group_ids,
                                      collate_fn=list)
    return list(loader)


def test_processes_share_each_aspect_grouped_global_batch(monkeypatch):
    """With aspect grouping, every step gives all processes images of one group (about the same size, so none
    waits long at the all-reduce); between them they see each image of the epoch at most once."""
    groups = [i % 3 for i in range(50)]
    ranks = [_batches(monkeypatch, r, 2, groups) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 50 // 4
    seen = []
    for first, second in zip(*ranks, strict=True):
        assert len(first) == len(second) == 2
        assert len({groups[i] for i in first + second}) == 1
        seen += first + second
    assert len(seen) == len(set(seen)) == 48
    alone = _batches(monkeypatch, 0, 1, groups, batch_size=4)  # one process: the plain grouped sampler
    assert [a + b for a, b in zip(*ranks, strict=True)] == alone
    assert _batches(monkeypatch, 0, 1, groups, batch_size=4, epoch=4) != alone  # shuffled by epoch
    ungrouped = [_batches(monkeypatch, r, 2, None) for r in (0, 1)]  # without grouping: shared out the same way
    seen = [i for first, second in zip(*ungrouped, strict=True) for i in first + second]
    assert len(seen) == len(set(seen)) == 48 and seen != list(range(48))


def _mean_over_two_processes(rank, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values = {"loss": 1.0 + 2 * rank, "loss_rpn": 0.5}
        results[rank] = [engine.mean_over_processes(values, True, torch.device("cpu")),
                         engine.mean_over_processes(values, rank == 0, torch.device("cpu"))]
    finally:
        torch.distributed.destroy_process_group()


def test_losses_are_averaged_and_a_divergence_seen_by_every_process():
    """The one all-reduce of a training step: the mean losses for the log, and a non-finite loss on any process
    (rank 1 here) reported to all, so that they stop together."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_mean_over_two_processes, args=(free_local_port(), results), nprocs=2)
    for rank in (0, 1):
        (mean, all_finite), (_, with_a_nan_on_rank_1) = results[rank]
        assert mean == {"loss": 2.0, "loss_rpn": 0.5} and all_finite
        assert not with_a_nan_on_rank_1
    assert engine.mean_over_processes({"loss": 3.0}, True, torch.device("cpu")) == ({"loss": 3.0}, True)  # alone


def test_processes_to_launch_one_per_core_dividing_the_batch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    auto = make_config("embedded-cpu", cpu_processes=0, batch_size=4)
    assert [processes_to_launch(auto, cores) for cores in (1, 2, 3, 4, 16)] == [1, 2, 2, 4, 4]
    assert processes_to_launch(dataclasses.replace(auto, batch_size=6), 4) == 3  # 4 does not divide 6
    assert processes_to_launch(dataclasses.replace(auto, cpu_processes=1), 16) == 1
    assert processes_to_launch(dataclasses.replace(auto, device="cuda"), 16) == 1  # GPUs: torchrun, by hand
    monkeypatch.setenv("RANK", "0")  # already one of torchrun's processes: never launch again
    assert processes_to_launch(auto, 16) == 1


def test_command_line_launches_two_one_thread_processes(tmp_path, data_root):
    out = tmp_path / "auto"
    cmd = [sys.executable, "-m", "frcnn_tutorial.train", "--preset", "embedded-cpu", "--cpu-processes", "2",
           "--data-root", str(data_root), "--train-images", "0", "--out", str(out), "--max-iters", "2",
           "--min-size", "96", "--max-size", "128", "--progress", "false", "--test-split", "val"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launching 2 one-thread processes" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 2
    assert len(set(metrics["weights_checksums"])) == 1


def test_predict_draws_detections(tmp_path, data_root, embedded_run):
    from frcnn_tutorial.predict import main as predict_main

    _, out = embedded_run
    image = next((data_root / "embedded").rglob("*.jpg"))
    assert predict_main(["--checkpoint", str(out / "last.pt"), str(image), "--out", str(tmp_path / "pred"),
                         "--score-threshold", "0.0"]) == 0
    assert (tmp_path / "pred" / f"{image.stem}.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no such image"):
        predict_main(["--checkpoint", str(out / "last.pt"), str(tmp_path / "missing.jpg"), "--out",
                      str(tmp_path / "pred")])
    assert predict_main(["--checkpoint", str(tmp_path / "nothing.pt"), str(image), "--out", str(tmp_path)]) == 2


def test_grad_scaler_path_of_train_step(tmp_path, data_root):
    """The CUDA AMP path (GradScaler: scale, step, update) run on the CPU with the CPU scaler and bf16 autocast."""
    from frcnn_tutorial.data import collate_fn, embedded_dataset
    from frcnn_tutorial.model import faster_rcnn_tiny_fpn

    torch.manual_seed(0)
    model = faster_rcnn_tiny_fpn(7, min_size=96, max_size=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    images, targets = collate_fn([embedded_dataset("train", root=data_root / "embedded")[i] for i in range(2)])
    before = [p.detach().clone() for p in model.parameters()]
    values = engine.train_step(model, list(images), list(targets), optimizer, scaler=scaler, amp=True,
                               device=torch.device("cpu"))
    assert set(values) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss"}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**8  # finite gradients: the scale stays (it grows only after 2000 steps)


def test_train_speed_bench_compares_the_same_model(data_root):
    """bench train-speed: torchvision's FasterRCNN around our tiny backbone, same weights -> same losses."""
    from frcnn_tutorial.bench import embedded_batch, tiny_models

    ours, tv = tiny_models(min_size=96, max_size=128)
    images, targets = embedded_batch(2, root=data_root / "embedded")
    torch.manual_seed(0)
    a = ours.train()(images, targets)
    torch.manual_seed(0)
    b = tv.train()(images, targets)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    """Without the tensorboard package the log is still written (TensorBoard events only when it is installed)."""
    import builtins

    from frcnn_tutorial.train import RunLog

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    log = RunLog(tmp_path, enabled=True)
    assert log.tb is None
    log.write(1, {"loss": 1.0})
    log.write(1, {"mAP": 0.5})
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "step,loss,mAP"
