import functools
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # benchmarks.algorithm1: the paper's Algorithm 1, the reference tests compare with


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after: the ops of small models are short, and on a busy
    machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: How to get each data set the tests read without a network (a skip names it).
HOW_TO_GET = {
    "fashion_mnist": "apt-get install dataset-fashion-mnist",
    "mnist": "a copy in ../shared/data/mnist or SUPERMASK_FX_DATA (see docs/install.md)",
    "cifar10": "a copy in ../shared/data/cifar10-jpeg or SUPERMASK_FX_DATA (see docs/install.md)",
}


@functools.cache
def dataset_is_local(name: str) -> bool:
    """Whether ``name`` loads without a download. A local copy that is there but broken raises: it fails the
    tests instead of skipping them."""
    from supermask_fx.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset(name, "test", download=False, limit=1)
    except DatasetNotFoundError:
        return False
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*names): skip unless each data set loads without a download")
    _force_popup_options()


def _force_popup_options() -> None:
    """``SUPERMASK_FX_TEST_FORCE="score_dtype=bfloat16"`` (comma-separated ``field=value``; ``true``, ``false`` and
    numbers are read as JSON): every ``PopupConfig`` that leaves the field at its default gets that value, to run the
    whole suite with an option forced where it applies (a config the value does not apply to, which it would make
    invalid, keeps its own)."""
    import dataclasses
    import json
    import os

    forced = os.environ.get("SUPERMASK_FX_TEST_FORCE")
    if not forced:
        return
    from supermask_fx.core.config import PopupConfig

    def parse(value: str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value

    values = {name: parse(value) for name, value in (item.split("=", 1) for item in forced.split(","))}
    defaults = {f.name: f.default for f in dataclasses.fields(PopupConfig)}
    original = PopupConfig.__post_init__

    def post_init(self):
        unset = [field for field in values if getattr(self, field) == defaults[field]]
        for field in unset:
            object.__setattr__(self, field, values[field])
        try:
            original(self)
        except ValueError:  # the forced value does not apply to this config (weight_storage=bits, init=...)
            if not unset:
                raise
            for field in unset:
                object.__setattr__(self, field, defaults[field])
            original(self)

    PopupConfig.__post_init__ = post_init


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_data"):
        missing = [name for name in mark.args if not dataset_is_local(name)]
        if missing:
            how = (f"{name} ({HOW_TO_GET.get(name, 'download it')})" for name in missing)
            pytest.skip("not local: " + "; ".join(how))


@pytest.fixture
def local_dataset():
    """``dataset_is_local`` for tests that compare against it."""
    return dataset_is_local
