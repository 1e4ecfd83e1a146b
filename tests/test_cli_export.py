"""`csprune inspect` / `csprune export` command line."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from csprune.cli import main
from csprune.export import load_sparse, save_sparse


def _state():
    weight = torch.zeros(32, 20)
    weight.view(-1)[::5] = torch.arange(1, 129, dtype=torch.float32)
    return {"w": weight, "b": torch.ones(32)}


def test_export_training_checkpoint_and_inspect(tmp_path, capsys):
    checkpoint = tmp_path / "train.pt"
    torch.save({"model": _state(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "step": 7}, checkpoint)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(checkpoint), str(out)]) == 0
    loaded = load_sparse(out)
    assert torch.equal(loaded["w"], _state()["w"]) and torch.equal(loaded["b"], _state()["b"])

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in report["tensors"]] == ["w", "b"]
    assert report["tensors"][0]["nnz"] == 128 and report["tensors"][0]["sparsity"] == pytest.approx(0.8)
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["tensor", "shape", "enc"]
    assert "compression ratio" in table


def test_export_plain_state_dict_fp16(tmp_path):
    checkpoint = tmp_path / "sd.pt"
    torch.save(_state(), checkpoint)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(checkpoint), str(out), "--values-dtype", "float16"]) == 0
    assert load_sparse(out)["w"].dtype == torch.float16


def test_export_refuses_pickled_objects(tmp_path, capsys):
    checkpoint = tmp_path / "evil.pt"
    torch.save({"model": _state(), "args": argparse.Namespace(lr=0.1)}, checkpoint)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(checkpoint), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("csprune: error: ") and "weights_only" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "argv_tail, content",
    [
        (["inspect"], b"not a safetensors file"),
        (["export"], b"garbage"),
    ],
)
def test_bad_input_one_line_nonzero(tmp_path, capsys, argv_tail, content):
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    argv = [argv_tail[0], str(path)] + ([str(tmp_path / "o.safetensors")] if argv_tail[0] == "export" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("csprune: error: ") and str(path) in err and err.count("\n") == 1


def test_export_refuses_non_state_dict(tmp_path, capsys):
    checkpoint = tmp_path / "list.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": 1} | {"x": 3}, checkpoint)
    assert main(["export", str(checkpoint), str(tmp_path / "o.safetensors")]) == 0  # 'model' key wins
    torch.save({"a": 1, "b": torch.ones(2)}, checkpoint)
    assert main(["export", str(checkpoint), str(tmp_path / "o.safetensors")]) == 1
    assert "not tensors" in capsys.readouterr().err


def test_inspect_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("csprune ")


def test_save_sparse_module_meta(tmp_path):
    out = tmp_path / "m.safetensors"
    save_sparse(torch.nn.Linear(3, 2), out, meta={"model": {"dim": 3}})
    assert main(["inspect", str(out)]) == 0
