"""Shared fixtures: the real data dir and the default model (fetched and converted once, cached)."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir():
    from hippocrates.models.paths import data_dir as find
    return find()


@pytest.fixture(scope="session")
def smollm2_dir():
    from hippocrates.models.fetch import fetch_smollm2
    return fetch_smollm2()
