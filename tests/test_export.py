"""`cifar-bp export`: a real ONNX export of a real run, run by a real onnxruntime session."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import cifar_bp.errors
import cifar_bp.export
from cifar_bp.checkpoint import load_checkpoint
from cifar_bp.config import ModelConfig
from cifar_bp.export import export_checkpoint
from cifar_bp.model import build_model
from tests.helpers import Cli
from tests.test_predict import FEW, train_few_class_run, train_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("runs"))


def reference_logits(run_dir: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The checkpoint's weight average, normalising outside the net as training did."""
    payload = load_checkpoint(run_dir)
    data = payload["config"]["data"]
    model = build_model(ModelConfig(channels_last=False)).eval()
    model.load_state_dict(payload["average"]["weights"])
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((pixels - mean) / std)


def run_onnx(path: Path, pixels: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    return torch.from_numpy(logits)


def test_export_runs_in_onnxruntime(cli: Cli, run_dir: Path) -> None:
    result = cli("export", "--checkpoint", run_dir)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    path = run_dir / "model.onnx"
    assert lines[-1] == str(path) and path.is_file()
    assert "exported the weight average" in lines[0]
    (check,) = [line for line in lines if "max abs logit difference" in line]
    reported = float(check.split("max abs logit difference ")[1].split()[0])
    assert 0 <= reported <= 1e-4
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    # Any batch size, [0, 1] pixels in, the run's own logits out (normalisation inside).
    gen = torch.Generator().manual_seed(7)
    for n in (1, 7):
        pixels = torch.rand(n, 3, 32, 32, generator=gen)
        got = run_onnx(path, pixels)
        assert got.shape == (n, 10)
        torch.testing.assert_close(got, reference_logits(run_dir, pixels), atol=1e-4, rtol=0)
    model = onnx.load(str(path))
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic: dynamic batch
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == load_checkpoint(run_dir)["classes"]


def test_output_and_json(cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "net.onnx"
    result = cli("export", "--checkpoint", run_dir / "last.pt", "--output", target, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == str(target) and target.is_file()
    assert report["batches"] == [16, 3] and report["weight_average"] is True
    assert 0 <= report["max_abs_diff"] <= report["tolerance"] == 1e-4
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        run_onnx(target, pixels), reference_logits(run_dir, pixels), atol=1e-4, rtol=0
    )


def test_missing_onnxruntime_is_one_line(
    cli: Cli, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    result = cli("export", "--checkpoint", run_dir, "--output", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert result.stderr == "error: export needs onnxruntime: pip install 'cifar-bp[onnx]'\n"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_nothing(
    cli: Cli, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cifar_bp.export, "TOLERANCE", -1.0)  # no difference can pass
    result = cli("export", "--checkpoint", run_dir, "--output", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: onnxruntime and torch disagree: max abs logit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_dynamo_exporter_fallback(
    cli: Cli, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a newer torch has dropped the TorchScript exporter, the dynamo one takes over."""
    real_export = torch.onnx.export

    def no_legacy(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise RuntimeError("the TorchScript exporter is gone")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_legacy)
    target = tmp_path / "m.onnx"
    result = cli("export", "--checkpoint", run_dir, "--output", target, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exporter"] == "dynamo"
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        run_onnx(target, pixels), reference_logits(run_dir, pixels), atol=1e-4, rtol=0
    )


def test_a_three_class_run_exports_its_ten_outputs(cli: Cli, tmp_path: Path) -> None:
    """The net has ten outputs whatever the run's classes: the check compares against them."""
    run = train_few_class_run(tmp_path)
    result = cli("export", "--checkpoint", run)
    assert result.exit_code == 0, result.output
    assert "  output 'logits' float32 N×10 (the first 3 are the run's classes: cat, dog, fox)" in (
        result.stdout.splitlines()
    )
    path = run / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == FEW
    payload = load_checkpoint(run)
    model = build_model(ModelConfig(channels_last=False)).eval()
    model.load_state_dict(payload["model"])
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # smoke.yaml: no normalisation, no weight average
        torch.testing.assert_close(run_onnx(path, pixels), model(pixels), atol=1e-4, rtol=0)
    report = json.loads(cli("export", "--checkpoint", run, "--json").stdout)
    assert (report["outputs"], report["classes"]) == (10, FEW)


def test_output_to_a_folder_writes_model_onnx_inside(cli: Cli, run_dir: Path, tmp_path: Path):
    # A trailing slash names a folder even before it exists.
    typed = cli("export", "--checkpoint", run_dir, "-o", f"{tmp_path / 'new' / 'dir'}/")
    assert typed.exit_code == 0, typed.output
    written = tmp_path / "new" / "dir" / "model.onnx"
    assert typed.stdout.splitlines()[-1] == str(written) and written.is_file()
    assert [p.name for p in written.parent.iterdir()] == ["model.onnx"]
    existing = tmp_path / "existing"
    existing.mkdir()
    shown = cli("export", "--checkpoint", run_dir, "-o", existing)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[-1] == str(existing / "model.onnx")
    assert (existing / "model.onnx").is_file()


def test_a_failed_export_into_a_new_folder_leaves_no_folder(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cifar_bp.export, "TOLERANCE", -1.0)
    with pytest.raises(cifar_bp.errors.CliError, match="disagree"):
        export_checkpoint(run_dir, f"{tmp_path / 'new'}/")
    assert list(tmp_path.iterdir()) == []
