"""The VOC reader on tiny devkit trees built here: coordinates, targets, bad input, --check, --download."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from frcnn_tutorial.data import voc
from frcnn_tutorial.data.voc import VOC_CLASSES, HalfExtractedError, VOCDetection, VOCFormatError

ROOT = Path(__file__).resolve().parent.parent

# Two images: a 30x20 (w x h) one with a dog and a difficult person, a 16x12 one with a cat touching every border.
SAMPLES = {
    "000001": ((20, 30), [("dog", (1, 2, 10, 20), 0), ("person", (5, 5, 30, 20), 1)]),
    "000002": ((12, 16), [("cat", (1, 1, 16, 12), 0)]),
}


def xml_text(image_id, size, objects):
    h, w = size
    parts = [f"<annotation><filename>{image_id}.jpg</filename>",
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_sample(voc_dir, image_id, size, objects, colour=(200, 100, 50)):
    Image.new("RGB", (size[1], size[0]), colour).save(voc_dir / "JPEGImages" / f"{image_id}.jpg", quality=95)
    (voc_dir / "Annotations" / f"{image_id}.xml").write_text(xml_text(image_id, size, objects))


def make_tree(root, year="2007", samples=SAMPLES, splits=None):
    voc_dir = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (size, objects) in samples.items():
        write_sample(voc_dir, image_id, size, objects)
    for split, ids in (splits or {"trainval": list(samples)}).items():
        (voc_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc_dir


@pytest.fixture
def tree(tmp_path):
    make_tree(tmp_path)
    return tmp_path


def test_voc_classes_are_the_twenty_in_standard_order():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_CLASSES.index("dog") == 11 and VOC_CLASSES.index("person") == 14  # labels 12 and 15


def test_sample_golden_target(tree):
    dataset = VOCDetection(tree, year="2007", image_set="trainval")
    assert len(dataset) == 2 and dataset.classes == VOC_CLASSES
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    # A flat JPEG decodes to (almost) its colour: 0..1 floats, not 0..255.
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([200, 100, 50]) / 255, atol=3 / 255)
    # dog: xmin=1 ymin=2 xmax=10 ymax=20 (1-based, inclusive) -> x1=0 y1=1 x2=10 y2=20: 10 x 19 pixels
    # person: 5,5,30,20 -> 4,4,30,20 (x2 = 30 = the image width: the last pixel column included)
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 1.0, 10.0, 20.0], [4.0, 4.0, 30.0, 20.0]]))
    assert target["boxes"].dtype == torch.float32
    assert torch.equal(target["labels"], torch.tensor([12, 15])) and target["labels"].dtype == torch.int64
    assert torch.equal(target["difficult"], torch.tensor([False, True]))
    assert int(target["image_id"]) == 0 and dataset.ids[0] == "000001"
    assert torch.equal(target["orig_size"], torch.tensor([20, 30]))
    _, target = dataset[1]
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0.0, 16.0, 12.0]]))  # the whole 16x12 image


def test_boxes_match_torchvision_parse_of_the_same_files(tree):
    """torchvision's VOCDetection returns the raw XML strings; ours = those numbers, xmin/ymin minus one."""
    theirs = torchvision.datasets.VOCDetection(str(tree), year="2007", image_set="trainval")
    ours = VOCDetection(tree, year="2007", image_set="trainval")
    for i in range(len(ours)):
        objects = theirs[i][1]["annotation"]["object"]
        expected = [[float(o["bndbox"]["xmin"]) - 1, float(o["bndbox"]["ymin"]) - 1, float(o["bndbox"]["xmax"]),
                     float(o["bndbox"]["ymax"])] for o in objects]
        assert torch.equal(ours[i][1]["boxes"], torch.tensor(expected))
        assert [VOC_CLASSES[k - 1] for k in ours[i][1]["labels"]] == [o["name"] for o in objects]


def test_keep_difficult_false_drops_difficult_objects(tree):
    _, target = VOCDetection(tree, keep_difficult=False)[0]
    assert target["labels"].tolist() == [12] and not target["difficult"].any()
    assert target["boxes"].shape == (1, 4)


def test_own_classes_any_year_and_split_name(tmp_path):
    samples = {"a_1": ((10, 10), [("widget", (2, 2, 5, 5), 0), ("gadget", (1, 1, 10, 10), 0)])}
    make_tree(tmp_path, year="2012", samples=samples, splits={"my_split": ["a_1"]})
    dataset = VOCDetection(tmp_path, year=2012, image_set="my_split", classes=["gadget", "widget"])
    assert dataset.classes == ("gadget", "widget")
    assert dataset[0][1]["labels"].tolist() == [2, 1]  # label k is classes[k-1]
    assert dataset.get_height_and_width(0) == (10, 10)


def test_an_image_without_objects_gives_empty_targets(tmp_path):
    make_tree(tmp_path, samples={"empty": ((8, 8), [])})
    _, target = VOCDetection(tmp_path)[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["difficult"].shape == (0,)


def test_voc07_12_trainval_concatenates_both_years(tmp_path):
    make_tree(tmp_path, year="2007")
    make_tree(tmp_path, year="2012", samples={"2008_000001": SAMPLES["000002"]})
    both = voc.voc07_12_trainval(tmp_path)
    assert isinstance(both, torch.utils.data.ConcatDataset) and len(both) == 3
    assert both.datasets[1].classes == VOC_CLASSES and both[2][1]["labels"].tolist() == [8]  # cat


def test_missing_year_folder_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOC2012.*--download"):
        VOCDetection(tmp_path, year="2012")


def test_missing_split_lists_the_splits_there(tree):
    with pytest.raises(VOCFormatError, match=r"test\.txt: split file not found \(splits here: trainval\)"):
        VOCDetection(tree, image_set="test")


# ----------------------------------------------------------------------------- bad input, one error each


def break_xml(voc_dir):
    (voc_dir / "Annotations" / "000001.xml").write_text("<annotation><size><width>30</width>")
    return "000001.xml", "malformed XML"


def entity_xml(voc_dir):
    bomb = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><annotation>&lol2;'
    (voc_dir / "Annotations" / "000001.xml").write_text(bomb + "</annotation>")
    return "000001.xml", "refused XML that declares entities"


def missing_jpeg(voc_dir):
    (voc_dir / "JPEGImages" / "000002.jpg").unlink()
    return "000002.jpg", "image file not found"


def garbage_jpeg(voc_dir):
    (voc_dir / "JPEGImages" / "000002.jpg").write_bytes(b"not a jpeg at all")
    return "000002.jpg", "corrupt or unreadable image"


def truncated_jpeg(voc_dir):
    path = voc_dir / "JPEGImages" / "000001.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-200])  # cut off the end, as an interrupted copy would
    return "000001.jpg", "corrupt or unreadable image"


def unknown_class(voc_dir):
    write_sample(voc_dir, "000002", (12, 16), [("unicorn", (1, 1, 5, 5), 0)])
    return "000002.xml", "unknown class 'unicorn'"


def box_outside(voc_dir):
    write_sample(voc_dir, "000002", (12, 16), [("cat", (1, 1, 17, 12), 0)])  # xmax 17 > width 16
    return "000002.xml", "lies outside the 16x12 image"


def box_at_zero(voc_dir):
    write_sample(voc_dir, "000002", (12, 16), [("cat", (0, 1, 5, 5), 0)])  # VOC pixels start at 1
    return "000002.xml", "lies outside"


def zero_area(voc_dir):
    write_sample(voc_dir, "000002", (12, 16), [("cat", (6, 2, 4, 5), 0)])  # xmax < xmin
    return "000002.xml", "has zero area"


def size_mismatch(voc_dir):
    (voc_dir / "Annotations" / "000002.xml").write_text(xml_text("000002", (13, 16), []))
    return "000002.jpg", "image is 16x12 but its annotation says 16x13"


BAD_INPUTS = [break_xml, entity_xml, missing_jpeg, garbage_jpeg, truncated_jpeg, unknown_class, box_outside,
              box_at_zero, zero_area, size_mismatch]


@pytest.mark.parametrize("damage", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_raises_one_error_naming_file_and_problem(tree, damage):
    file_name, problem = damage(tree / "VOCdevkit" / "VOC2007")
    dataset = VOCDetection(tree)
    index = dataset.ids.index(file_name.split(".")[0])
    with pytest.raises(VOCFormatError) as info:
        dataset[index]
    message = str(info.value)
    assert file_name in message and problem in message, message
    assert isinstance(info.value, ValueError)
    assert dataset[1 - index][0].shape[0] == 3  # the other image still loads


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "sub/000001", "..", "a\\b"])
def test_image_set_ids_with_path_separators_are_refused(tree, bad_id):
    split = tree / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(f"000001\n{bad_id}\n")
    with pytest.raises(VOCFormatError, match=r"trainval\.txt: line 2: image id .* path separator or '\.\.'"):
        VOCDetection(tree)


# ----------------------------------------------------------------------------- --check


def test_check_clean_tree_exits_zero_with_a_summary(tree, capsys):
    assert voc.main(["--check", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "VOC2007: checked 2 images (splits: trainval): clean" in out and "OK" in out


def test_check_lists_every_bad_file_and_exits_non_zero(tree, capsys):
    voc_dir = tree / "VOCdevkit" / "VOC2007"
    break_xml(voc_dir)
    missing_jpeg(voc_dir)
    (voc_dir / "ImageSets" / "Main" / "val.txt").write_text("000002\n../x\n")
    assert voc.main(["--check", str(tree), "--year", "2007"]) == 1
    out = capsys.readouterr().out
    assert "000001.xml: malformed XML" in out and "000002.jpg: image file not found" in out
    assert "val.txt: line 2" in out and "3 problem(s)" in out


def test_check_split_and_classes_options(tmp_path, capsys):
    make_tree(tmp_path, samples={"x": ((10, 10), [("widget", (2, 2, 5, 5), 0)])}, splits={"train": ["x"]})
    assert voc.main(["--check", str(tmp_path), "--split", "train"]) == 1  # widget is no VOC class
    assert "unknown class 'widget'" in capsys.readouterr().out
    assert voc.main(["--check", str(tmp_path), "--split", "train", "--classes", "widget"]) == 0


def test_check_command_line_exit_codes(tree):
    command = [sys.executable, "-m", "frcnn_tutorial.data.voc", "--check", str(tree)]
    clean = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert clean.returncode == 0 and "clean" in clean.stdout and clean.stderr == ""
    zero_area(tree / "VOCdevkit" / "VOC2007")
    broken = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert broken.returncode == 1 and "000002.xml" in broken.stdout


def test_check_without_a_voc_folder_fails(tmp_path, capsys):
    assert voc.main(["--check", str(tmp_path)]) == 1
    assert "no VOC folder" in capsys.readouterr().out


# ----------------------------------------------------------------------------- --download (no network)


class FakeNetwork:
    """Stands in for torchvision's download_url / extract_archive; `die_after` simulates a kill mid-extraction."""

    def __init__(self, die_after=None):
        self.downloads, self.die_after = [], die_after

    def download_url(self, url, root, filename, md5):
        self.downloads.append((url, filename, md5))
        (Path(root) / filename).write_bytes(b"tar")

    def extract_archive(self, archive, root):
        voc_dir = Path(root) / "VOCdevkit" / ("VOC2012" if "2012" in archive else "VOC2007")
        for i in range(3):
            if i == self.die_after:
                raise KeyboardInterrupt
            (voc_dir / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (voc_dir / "JPEGImages" / f"{Path(archive).stem}_{i}.jpg").write_bytes(b"x")


@pytest.fixture
def network(monkeypatch):
    def install(**kwargs):
        fake = FakeNetwork(**kwargs)
        monkeypatch.setattr(voc, "download_url", fake.download_url)
        monkeypatch.setattr(voc, "extract_archive", fake.extract_archive)
        return fake

    return install


def test_download_uses_torchvision_urls_and_md5s_then_skips_when_done(tmp_path, network):
    fake = network()
    voc.download_voc(tmp_path, ["2007", "2012"])
    table = torchvision.datasets.voc.DATASET_YEAR_DICT
    assert fake.downloads == [(table[k]["url"], table[k]["filename"], table[k]["md5"])
                              for k in ("2007", "2007-test", "2012")]
    assert len(list((tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages").iterdir())) == 6  # trainval + test
    fake = network()
    voc.download_voc(tmp_path, ["2007", "2012"])
    assert fake.downloads == []  # markers say it is all there


def test_download_refuses_to_extract_over_an_interrupted_extraction(tmp_path, network):
    network(die_after=2)
    with pytest.raises(KeyboardInterrupt):
        voc.download_voc(tmp_path, ["2007"])
    fake = network()
    with pytest.raises(HalfExtractedError, match=r"VOC2007: the extraction of VOCtrainval_06-Nov-2007.tar was "
                                                 r"interrupted; delete"):
        voc.download_voc(tmp_path, ["2007"])
    assert fake.downloads == []  # refused before downloading anything


def test_download_refuses_a_tree_no_finished_download_wrote(tmp_path, network):
    (tmp_path / "VOCdevkit" / "VOC2012" / "Annotations").mkdir(parents=True)
    fake = network()
    with pytest.raises(HalfExtractedError, match="half-extracted"):
        voc.download_voc(tmp_path, ["2012"])
    assert fake.downloads == []
    voc.download_voc(tmp_path, ["2007"])  # another year's folder is untouched by that refusal
    assert len(fake.downloads) == 2


def test_download_command_rejects_other_years(capsys):
    with pytest.raises(SystemExit):
        voc.main(["--download", "--root", "unused", "--year", "2010"])
    assert "2007 and 2012" in capsys.readouterr().err
