"""The embedded dataset: VOC layout read by the VOC reader, determinism, content claims, caching, speed."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from frcnn_tutorial.data import EMBEDDED_CLASSES, VOCDetection, check_tree, embedded_dataset, make_embedded_dataset
from frcnn_tutorial.data import embedded as E
from frcnn_tutorial.data.voc import parse_annotation

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(num_train=60, num_val=6, num_test=10)


def voc_dir(root):
    return Path(root) / "VOCdevkit" / "VOCembedded"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_embedded_dataset(tmp_path_factory.mktemp("emb") / "embedded", seed=0, **SMALL)


@pytest.fixture(scope="module")
def objects(small):
    """Every object of the small train split: (image h, w, VOC XML element, parsed box) per object."""
    import defusedxml.ElementTree as ET

    dataset = VOCDetection(small, year="embedded", image_set="train", classes=EMBEDDED_CLASSES)
    rows = []
    for i in range(len(dataset)):
        path = dataset.annotation_path(i)
        ann = parse_annotation(path, EMBEDDED_CLASSES)
        for element, box, label in zip(ET.parse(path).getroot().iter("object"), ann["boxes"], ann["labels"],
                                       strict=True):
            rows.append({"size": ann["size"], "box": box, "label": int(label),
                         **{k: element.findtext(k) == "1" for k in ("difficult", "truncated", "occluded")}})
    return rows


def test_layout_is_the_voc_devkit_and_the_reader_reads_it(small):
    root = voc_dir(small)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        assert (root / sub).is_dir()
    lists = {s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in
             ("train", "val", "test", "trainval")}
    assert [len(lists[s]) for s in ("train", "val", "test")] == [60, 6, 10]
    assert lists["trainval"] == lists["train"] + lists["val"] and not set(lists["train"]) & set(lists["test"])
    image, target = embedded_dataset("test", root=small)[3]
    assert image.shape[0] == 3 and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert 128 <= image.shape[1] <= 320 and 128 <= image.shape[2] <= 320
    assert target["boxes"].shape[1] == 4 and target["labels"].min() >= 1
    assert target["labels"].max() <= len(EMBEDDED_CLASSES)
    assert embedded_dataset("train", root=small).classes == EMBEDDED_CLASSES


def test_the_voc_checker_finds_it_clean(small, capsys):
    assert check_tree(small, ["embedded"], None, EMBEDDED_CLASSES) == 0
    assert "VOCembedded: checked 76 images (splits: test, train, trainval, val): clean" in capsys.readouterr().out


def test_generation_is_deterministic_by_seed(tmp_path, small):
    again = make_embedded_dataset(tmp_path / "a", seed=0, **SMALL)
    other = make_embedded_dataset(tmp_path / "b", seed=1, num_train=3, num_val=0, num_test=0)
    names = sorted(p.relative_to(voc_dir(small)) for p in voc_dir(small).rglob("*") if p.is_file())
    for name in names:  # XML and JPEG bytes both
        assert (voc_dir(again) / name).read_bytes() == (voc_dir(small) / name).read_bytes(), name
    xml = "Annotations/train_000000.xml"
    assert (voc_dir(other) / xml).read_bytes() != (voc_dir(small) / xml).read_bytes()


def test_an_image_depends_only_on_seed_split_and_index(tmp_path, small):
    fewer = make_embedded_dataset(tmp_path, seed=0, num_train=2, num_val=1, num_test=1)
    for name in ("Annotations/train_000001.xml", "JPEGImages/val_000000.jpg", "Annotations/test_000000.xml"):
        assert (voc_dir(fewer) / name).read_bytes() == (voc_dir(small) / name).read_bytes()


def test_xml_golden_format():
    objects = [{"name": "star", "box": (1, 2, 30, 40), "truncated": True, "occluded": False, "difficult": False}]
    text = E.annotation_xml("train_000007", 200, 150, objects)
    assert "<size><width>150</width><height>200</height><depth>3</depth></size>" in text
    assert "<name>star</name>" in text and "<truncated>1</truncated>" in text and "<difficult>0</difficult>" in text
    assert "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>" in text


# ----------------------------------------------------------------------------- content claims


def test_every_class_appears_with_several_objects_per_image(objects):
    labels = [o["label"] for o in objects]
    assert len(EMBEDDED_CLASSES) >= 5 and set(labels) == set(range(1, len(EMBEDDED_CLASSES) + 1))
    assert len(objects) / SMALL["num_train"] >= 3  # 2..6 drawn, a few do not fit


def test_scales_run_from_about_12_px_to_most_of_the_image(objects):
    sides = np.array([np.sqrt((o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])) for o in objects])
    relative = sides / np.array([min(o["size"]) for o in objects])
    assert sides.min() <= 12 and relative.max() >= 0.6
    plain = [s for s, o in zip(sides, objects, strict=True) if not o["difficult"]]
    assert min(plain) >= E.DIFFICULT_SIZE  # anything smaller is marked difficult
    assert ((sides > 20) & (sides < 80)).mean() > 0.3  # and plenty in between


def test_aspect_ratios_vary(objects):
    ratios = np.array([(o["box"][3] - o["box"][1]) / (o["box"][2] - o["box"][0]) for o in objects])
    assert (ratios < 0.67).mean() > 0.1 and (ratios > 1.5).mean() > 0.1


def test_difficult_truncated_and_occluded_objects_are_present(objects):
    difficult = np.mean([o["difficult"] for o in objects])
    assert 0.02 < difficult < 0.3  # some, not most
    truncated = [o for o in objects if o["truncated"]]
    assert len(truncated) >= 5
    h_w = [o["size"] for o in truncated]
    # a shape cut by the border has its visible box touching that border
    touching = [b[0] == 0 or b[1] == 0 or b[2] == w or b[3] == h for b, (h, w) in
                zip((o["box"] for o in truncated), h_w, strict=True)]
    assert np.mean(touching) > 0.9
    assert sum(o["occluded"] for o in objects) >= 5


def test_boxes_are_tight_on_the_visible_pixels():
    rng = np.random.default_rng(3)
    image, objects = E.draw_image(160, 200, rng)
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["box"]
        assert 1 <= xmin <= xmax <= 200 and 1 <= ymin <= ymax <= 160  # VOC 1-based, inside the image
    assert image.shape == (160, 200, 3) and image.dtype == np.uint8


def test_each_shape_fills_its_box_edge_to_edge():
    rng = np.random.default_rng(0)
    for name in EMBEDDED_CLASSES:
        mask = E.shape_mask(name, 40, 24, rng)
        assert mask.shape == (24, 40)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), name


def test_textures_differ_between_classes():
    rng = np.random.default_rng(0)
    kinds = {E.TEXTURES[name] for name in EMBEDDED_CLASSES}
    assert len(kinds) == len(EMBEDDED_CLASSES)
    for kind in kinds:
        patch = E.texture(kind, 16, 16, rng)
        assert patch.shape == (16, 16, 3) and 0 <= patch.min() and patch.max() <= 255


# ----------------------------------------------------------------------------- caching


def test_a_finished_dataset_is_reused_and_other_settings_refused(tmp_path):
    root = make_embedded_dataset(tmp_path, seed=0, num_train=2, num_val=1, num_test=1)
    jpeg = voc_dir(root) / "JPEGImages" / "train_000000.jpg"
    stamp = jpeg.stat().st_mtime_ns
    make_embedded_dataset(tmp_path, seed=0, num_train=2, num_val=1, num_test=1)
    assert jpeg.stat().st_mtime_ns == stamp  # not redrawn
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_embedded_dataset(tmp_path, seed=1, num_train=2, num_val=1, num_test=1)
    make_embedded_dataset(tmp_path, seed=1, num_train=3, num_val=1, num_test=1, overwrite=True)
    assert len(VOCDetection(tmp_path, "embedded", "train", EMBEDDED_CLASSES)) == 3
    assert json.loads((voc_dir(root) / "COMPLETE.json").read_text())["seed"] == 1


def test_a_killed_generation_is_redone(tmp_path, monkeypatch):
    real, calls = E.write_sample, []

    def dies_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(E, "write_sample", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_embedded_dataset(tmp_path / "x", num_train=4, num_val=1, num_test=1)
    assert not (voc_dir(tmp_path / "x") / "COMPLETE.json").exists()
    (voc_dir(tmp_path / "x") / "JPEGImages" / "stray.jpg").write_bytes(b"half-written")
    monkeypatch.setattr(E, "write_sample", real)
    redone = make_embedded_dataset(tmp_path / "x", num_train=4, num_val=1, num_test=1)  # no marker: redrawn
    fresh = make_embedded_dataset(tmp_path / "y", num_train=4, num_val=1, num_test=1)
    files = sorted(p.relative_to(voc_dir(fresh)) for p in voc_dir(fresh).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(voc_dir(redone)) for p in voc_dir(redone).rglob("*") if p.is_file())
    assert all((voc_dir(redone) / f).read_bytes() == (voc_dir(fresh) / f).read_bytes() for f in files)


def test_embedded_dataset_uses_a_small_finished_set_and_redraws_an_old_version(tmp_path):
    root = make_embedded_dataset(tmp_path, seed=2, num_train=3, num_val=1, num_test=2)
    assert len(embedded_dataset("test", root=root)) == 2  # used as it is, not replaced by the default size
    marker = voc_dir(root) / "COMPLETE.json"
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({**old, "generator_version": 0}))
    first = voc_dir(root) / "Annotations" / "train_000000.xml"
    first.write_text("stale")
    assert len(embedded_dataset("train", root=root)) == 3  # same settings, redrawn
    assert first.read_text().startswith("<annotation>")
    assert json.loads(marker.read_text()) == old


def test_two_processes_generating_at_once_both_succeed(tmp_path):
    command = [sys.executable, "-m", "frcnn_tutorial.data.embedded", "--root", str(tmp_path), "--num-train", "30",
               "--num-val", "2", "--num-test", "2"]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and "embedded dataset ready" in out and err == "", err
    assert len(list((voc_dir(tmp_path) / "JPEGImages").iterdir())) == 34
    assert check_tree(tmp_path, ["embedded"], None, EMBEDDED_CLASSES) == 0


def test_command_line_with_check(tmp_path, capsys):
    assert E.main(["--root", str(tmp_path), "--num-train", "3", "--num-val", "1", "--num-test", "1", "--check"]) == 0
    out = capsys.readouterr().out
    assert "embedded dataset ready" in out and "checked 5 images" in out and "clean" in out


def test_default_set_lands_in_data_dir_and_generates_in_under_30_s(tmp_path, monkeypatch):
    monkeypatch.setenv("FRCNN_DATA", str(tmp_path))
    start = time.perf_counter()
    train = embedded_dataset("train")
    seconds = time.perf_counter() - start
    assert seconds < 30, f"generating the default set took {seconds:.1f} s"
    assert (tmp_path / "embedded" / "VOCdevkit" / "VOCembedded" / "COMPLETE.json").is_file()
    assert [len(train), len(embedded_dataset("val")), len(embedded_dataset("test"))] == [600, 100, 200]
