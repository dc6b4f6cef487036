"""Shared fixtures."""

import pytest

from frcnn_tutorial.data import make_embedded_dataset


@pytest.fixture(scope="session")
def tiny_embedded_root(tmp_path_factory):
    """Root of a tiny embedded dataset (3 train, 1 val, 2 test images), made once per test run."""
    return make_embedded_dataset(tmp_path_factory.mktemp("tiny_embedded"), seed=0, num_train=3, num_val=1, num_test=2)
