"""The package's front door: version, hello(), seeds, device, profile switch."""

import random

import numpy as np
import pytest
import torch

import frcnn_tutorial
from frcnn_tutorial import get_device, hello, profile, seed_everything


def test_hello_reports_versions_device_and_data(capsys):
    info = hello()
    printed = capsys.readouterr().out
    for key in ("torch", "torchvision", "device", "data"):
        assert key in info and str(info[key]) in printed
    assert info["frcnn_tutorial"] == frcnn_tutorial.__version__
    assert info["torch"].startswith("2.14.1") and info["torchvision"].startswith("0.29.1")


def test_seed_everything_makes_all_three_generators_repeat():
    seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_get_device_honours_preference_and_environment(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("FRCNN_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.delenv("FRCNN_DEVICE")
    assert get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_profile_switch(monkeypatch):
    monkeypatch.setenv("FRCNN_PROFILE", "ci")
    assert profile() == "ci"
    monkeypatch.setenv("FRCNN_PROFILE", "FULL")
    assert profile() == "full"
    monkeypatch.setenv("FRCNN_PROFILE", "fast")
    with pytest.raises(ValueError, match="FRCNN_PROFILE"):
        profile()


def test_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FRCNN_DATA", str(tmp_path))
    assert frcnn_tutorial.data_dir() == tmp_path.resolve()
