import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small built-in-style data set in the COCO layout (60 train, 8 val images)."""
    from dtrain.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic(out, train_images=60, val_images=8, seed=3)
    return out
