"""benchmarks/accuracy.py, the script behind the README's accuracy figures, on a tiny folder:
variants given with --try, seeds, and runs in parallel."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.test_folder import make_split

SCRIPT = str(ROOT / "benchmarks" / "accuracy.py")
CLASSES = ["cat", "dog", "frog"]


@pytest.mark.slow
def test_variants_and_seeds_run_in_parallel_and_are_each_reported(tmp_path):
    make_split(tmp_path / "data" / "train", CLASSES, per_class=40)
    cmd = [sys.executable, SCRIPT, "--root", str(tmp_path / "data"), "--workdir",
           str(tmp_path / "work"), "--only", "", "--jobs", "2", "--seeds", "0,1",
           "--try", "b16=train.batch_size=16", "--try", "ls0=loss.label_smoothing=0,train.seed=5",
           "--set", "train.epochs=1", "--set", "data.val_size=30", "--set", "train.batch_size=8",
           "--set", "log.histograms=false"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True).stdout
    table = out[out.index("recipe") :].splitlines()[1:]
    rows = {(cells[0], cells[1]): cells for cells in (line.split() for line in table)}
    # ls0 fixes its own seed, so --seeds 0,1 give it one run, reported with the seed it used.
    assert sorted(rows) == [("b16", "0"), ("b16", "1"), ("ls0", "5")]
    for cells in rows.values():
        assert cells[2] == "1" and 0 <= float(cells[3]) <= 1  # one epoch, an accuracy
    runs = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "work" / "runs").iterdir())
    assert runs == ["b16-s0", "b16-s1", "ls0-s5"]
    # --try's items come after --set's, so the variant's batch size won over the shared one.
    config = (tmp_path / "work" / "runs").glob("b16-s1-*/config.yaml")
    assert "batch_size: 16" in next(config).read_text()


def test_a_malformed_variant_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--root", str(tmp_path), "--try", "ls0"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "--try 'ls0': expected NAME=KEY=VALUE[,KEY=VALUE...]"
