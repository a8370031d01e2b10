"""Checkpoint files: nothing in one runs code, a damaged or foreign one is refused by name, and
temporary files are created exclusively (issue "Safe to resume")."""

import hashlib
import io
import json
import os
import pickle

import pytest
import torch

import pyro_mi
from pyro_mi.checkpoint import MAGIC, Checkpoint, read_file, write_file
from pyro_mi.examples.linear_vae import make_linear_vae
from pyro_mi.samplers.hmc import HMCState


class _Marker:
    """Unpickling this creates the file ``path``: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _with_header(fingerprint: str, body: bytes) -> bytes:
    header = {"fingerprint": fingerprint, "world_size": 1, "size": len(body),
              "sha256": hashlib.sha256(body).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n" + body


def _ais_run(path, **kw):
    ex = make_linear_vae(latent_dim=2, obs_dim=3)
    return pyro_mi.estimate_mi(ex.model, ex.obs_sites, method="ais", proposal="prior", num_data=8, num_steps=6,
                               num_chains=2, checkpoint=str(path), progress=False, **kw)


def test_a_payload_round_trips_with_pyro_mi_state_types(tmp_path):
    t = torch.arange(6.0).reshape(2, 3)
    state = HMCState(t, t[0], t[1], t, t)
    payload = {("main", 0, 1): {"state": state, "inf": float("inf"), "size": torch.Size([2, 3]), "gen":
                                torch.Generator().get_state()}, "list": [1, 2.5, None, "s", (3, True)]}
    path = str(tmp_path / "c")
    write_file(path, "fp", payload)
    back = read_file(path, "fp")
    assert type(back[("main", 0, 1)]["state"]) is HMCState
    torch.testing.assert_close(back[("main", 0, 1)]["state"].z, t)
    assert back[("main", 0, 1)]["inf"] == float("inf") and back["list"] == [1, 2.5, None, "s", (3, True)]
    assert back[("main", 0, 1)]["size"] == torch.Size([2, 3])


def test_a_type_outside_the_allow_list_is_not_saved(tmp_path):
    with pytest.raises(TypeError, match="cannot hold a _Marker"):
        write_file(str(tmp_path / "c"), "fp", {"x": _Marker(str(tmp_path / "m"))})


def test_a_crafted_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "run.ckpt"
    # 1. a pickle of the old format
    path.write_bytes(pickle.dumps({"fingerprint": "x", "payload": _Marker(str(marker))}))
    with pytest.raises(ValueError, match="is not a pyro_mi checkpoint"):
        _ais_run(path)
    # 2. this format with a valid checksum around a code-running pickle: torch's restricted loader refuses it
    buf = io.BytesIO()
    torch.save({"tree": "{}", "tensors": [_Marker(str(marker))]}, buf)
    path.write_bytes(_with_header("any", buf.getvalue()))
    with pytest.raises(ValueError, match="cannot be read"):
        read_file(str(path), "any")
    # 3. a JSON tree naming a type outside pyro_mi's state types
    buf = io.BytesIO()
    torch.save({"tree": json.dumps({"$state": "os:system", "fields": ["touch " + str(marker)]}), "tensors": []}, buf)
    path.write_bytes(_with_header("any", buf.getvalue()))
    with pytest.raises(ValueError, match="not a pyro_mi state type"):
        read_file(str(path), "any")
    assert not marker.exists()


def test_a_planted_rank_file_is_not_read_by_a_one_process_run(tmp_path):
    path = tmp_path / "run.ckpt"
    marker = tmp_path / "pwned"
    (tmp_path / "run.ckpt.rank3").write_bytes(pickle.dumps(_Marker(str(marker))))
    r = _ais_run(path)
    assert r.lower is not None and not marker.exists()


def test_a_foreign_or_damaged_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "run.ckpt"
    write_file(str(path), "another run", {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"run.ckpt' was written by a different run"):
        _ais_run(path)
    # flip one byte of the payload: the checksum names the file
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"run.ckpt' is damaged \(its payload does not match its checksum"):
        read_file(str(path), "another run")
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="is damaged"):
        read_file(str(path), "another run")
    path.write_bytes(MAGIC + b"{not json\n")
    with pytest.raises(ValueError, match=r"is damaged \(its header"):
        read_file(str(path), "another run")


def test_saves_follow_no_planted_link(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    path = tmp_path / "run.ckpt"
    # the old predictable temporary name, and every name a guess could give, point at the target
    os.symlink(target, f"{path}.{os.getpid()}.tmp")
    ckpt = Checkpoint(str(path), "fp")
    ckpt.save({"a": torch.ones(2)})
    ckpt.release()
    assert target.read_text() == "keep me"
    assert read_file(str(path), "fp")["a"].tolist() == [1.0, 1.0]
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp") and not os.path.islink(tmp_path / f)]
    assert leftovers == []


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ValueError, match=r"run.ckpt' cannot be saved: No space left on device"):
        write_file(str(path), "fp", {"a": torch.ones(2)})
    assert os.listdir(tmp_path) == []
