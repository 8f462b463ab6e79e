"""No file the product reads can run code: a checkpoint carrying a pickle payload is refused by
every command that loads one (exit 2), and the payload never runs."""

from __future__ import annotations

import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_dict, write_yaml
from rcnn_trainer.cli import eval_main, predict_main, train_main
from rcnn_trainer.runtime import checkpoint as ckpt_io
from rcnn_trainer.errors import UnsafeFile


class Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_copy(source, path, marker):
    ckpt = torch.load(source, weights_only=True)
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, path)
    assert not marker.exists()
    return path


def test_our_checkpoints_are_plain_data(trained):
    _, final = trained
    ckpt = torch.load(final, map_location="cpu", weights_only=True)  # raises if anything needs a global
    assert {"model", "optimizer", "scheduler", "rng", "config", "health"} <= set(ckpt)


def test_eval_and_predict_refuse_a_hostile_checkpoint(trained, tmp_path, capsys):
    config, final = trained
    marker = tmp_path / "MARKER"
    evil = hostile_copy(final, tmp_path / "evil.pth", marker)
    assert eval_main(["--config", str(config), "--checkpoint", str(evil), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "evil.pth" in err and "refused" in err and "run code" in err
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    assert predict_main(["--config", str(config), "--checkpoint", str(evil), str(tmp_path / "a.png"),
                         "--output-dir", str(tmp_path / "pred"), "--no-progress"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_refuses_a_hostile_checkpoint_in_the_run_folder(trained, tmp_path, capsys):
    config, final = trained
    run = tmp_path / "run"
    shutil.copytree(final.parent, run)
    marker = tmp_path / "MARKER"
    newest = ckpt_io.periodic_checkpoints(run / "checkpoints")[0]
    hostile_copy(newest, newest, marker)
    raw = tiny_dict(tmp_path, solver={"max_iters": 6})
    code = train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--resume", "--no-progress"])
    assert code == 2 and newest.name in capsys.readouterr().err
    assert not marker.exists()


def test_backbone_weights_file_with_a_payload_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, tmp_path / "backbone.pth")
    raw = tiny_dict(tmp_path)
    raw["model"]["backbone"].update(weights=str(tmp_path / "backbone.pth"), norm="frozen_bn")
    assert train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--no-progress"]) == 2
    assert "model.backbone.weights" in capsys.readouterr().err and not marker.exists()


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    # before this change the RNG states were saved as pickled numpy arrays
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": []}
    torch.save({"model": {}, "rng": [state]}, tmp_path / "old.pth")
    ckpt = ckpt_io.load_checkpoint(tmp_path / "old.pth")
    expected = np.random.rand()
    ckpt_io.restore_rng_state(ckpt["rng"][0])
    assert np.random.rand() == expected


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.save({"model": {}, "rng": [ckpt_io.rng_state()]}, tmp_path / "new.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt_io.restore_rng_state(ckpt_io.load_checkpoint(tmp_path / "new.pth")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class NumpyPayload(Payload):
    """The same, through a numpy function: numpy globals beyond the legacy array types stay refused."""

    def __reduce__(self):
        return (np.savetxt, (self.marker, np.zeros(1)))


@pytest.mark.parametrize("payload", [Payload, NumpyPayload])
def test_a_planted_payload_is_refused_before_it_runs(tmp_path, payload):
    marker = tmp_path / "MARKER"
    path = tmp_path / "planted.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "rng": [np.random.get_state()], "x": payload(marker)}, path)
    with pytest.raises(UnsafeFile) as refused:
        ckpt_io.load_checkpoint(path)
    message = str(refused.value)
    assert str(path) in message and "refused" in message and "run code" in message
    assert ("io.open" if payload is Payload else "numpy.savetxt") in message  # names what it would call
    assert not marker.exists()
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(payload(control)))  # the control: unpickled without the guard, it runs
    assert control.exists()
