"""TensorBoard event files (read back by the tensorboard package's own reader) and loss.svg,
from a real run that resumes."""

import importlib.util
import json
import struct
import xml.etree.ElementTree as ET

import pytest

from dtrain.plots import loss_svg, read_history
from dtrain.tbevents import EventWriter, crc32c, masked_crc32c, tfrecord
from dtrain_run import run_dtrain

SMALL = ["--batch-size", "8", "--hidden-dim", "12", "--wordvec-dim", "8", "--log-every", "1",
         "--eval-images", "8", "--eval-captions", "16", "--max-length", "6", "--quiet"]


def test_crc32c_and_framing():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0
    rec = tfrecord(b"abc")
    assert struct.unpack("<Q", rec[:8])[0] == 3 and rec[12:15] == b"abc"
    assert struct.unpack("<I", rec[8:12])[0] == masked_crc32c(rec[:8])
    assert struct.unpack("<I", rec[15:])[0] == masked_crc32c(b"abc")


def _accumulator(directory):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_writer_read_back_by_tensorboard(tmp_path):
    w = EventWriter(tmp_path / "tb")
    for step in (1, 2, 300000):
        w.scalars(step, {"train/loss": 2.5 / step, "train/lr": -1e-3, "skip": None})
    w.text(7, "val/samples", "| sampled | references |\n|---|---|\n| a dog | a cat é |")
    ea = _accumulator(tmp_path / "tb")
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 300000]
    assert [e.value for e in loss] == pytest.approx([2.5, 1.25, 2.5 / 300000], rel=1e-7)
    assert ea.Scalars("train/lr")[0].value == pytest.approx(-1e-3)
    assert "skip" not in ea.Tags()["scalars"]
    (text,) = ea.Tensors("val/samples")
    assert text.step == 7
    assert text.tensor_proto.string_val[0].decode() == \
        "| sampled | references |\n|---|---|\n| a dog | a cat é |"


def test_history_replays_resumes(tmp_path):
    recs = [{"kind": "start", "step": 0, "resumed_from": None},
            *({"kind": "train", "step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)),
            {"kind": "eval", "step": 4, "val_loss": 7.0, "bleu4": 0.1, "cider_d": 0.2},
            {"kind": "start", "step": 2, "resumed_from": "ckpt-2.h5"},
            *({"kind": "train", "step": s, "loss": 20.0 - s} for s in (3, 4, 5))]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')
    h = read_history(path)
    assert h["train"] == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    assert h["eval"] == [] and h["resumes"] == [2]
    svg = loss_svg(h)
    ET.fromstring(svg)  # well-formed
    assert "resumed @ 2" in svg and "train loss" in svg


@pytest.mark.timeout(240)
def test_run_writes_tensorboard_and_loss_svg(tiny_data, tmp_path):
    out = tmp_path / "ck"
    run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", out, *SMALL, "--steps", 4,
               "--eval-every", 2)
    run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", out, *SMALL, "--steps", 6,
               "--eval-every", 2, "--resume", "latest")
    svg = (out / "loss.svg").read_text()
    ET.fromstring(svg)
    assert "resumed @ 4" in svg and "CIDEr-D" in svg and "val loss" in svg
    if importlib.util.find_spec("matplotlib"):  # loss.png too, the resume marked
        assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert all("cider_d" in e and "rouge_l" in e for e in evals)
    ea = _accumulator(out / "tensorboard")
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    for tag in ("train/tokens_per_s", "train/step_ms", "train/comm_share", "train/lr",
                "val/loss", "val/bleu4", "val/rouge_l", "val/cider_d"):
        assert tag in ea.Tags()["scalars"], tag
    final = [e for e in evals if e["final"]][-1]
    assert ea.Scalars("val/cider_d")[-1].value == pytest.approx(final["cider_d"], rel=1e-6)
    assert "sampled" in ea.Tensors("val/samples")[-1].tensor_proto.string_val[0].decode()
