"""Exit codes are the same across commands (issue 14, class 7): 2 for what the user can fix
in the command or the config, 1 for a runtime failure; always one line, never a traceback."""

from __future__ import annotations

import pytest

from tests.helpers import SMOKE, Cli

TINY = ["-c", str(SMOKE), "-q", "--set", "data.train_size=128", "--set", "data.test_size=64"]
COMMANDS = {
    "train": ["train", "-c", "SMOKE"],
    "evaluate": ["evaluate", "--checkpoint", "GOOD"],
    "inspect-grads": ["inspect-grads", "-c", "SMOKE"],
    "losses": ["losses"],
    "compare": ["compare", "-c", "SMOKE"],
    "config-show": ["config", "show", "-c", "SMOKE"],
}
NO_DATA = ["--set", "data.source=cifar10", "--set", "data.root=EMPTY", "--set",
           "data.download=false"]  # fmt: skip

# (id, argv with placeholders, expected exit code)
CASES = [
    *[(f"{name}-unknown-option", [*argv, "--no-such-option"], 2)
      for name, argv in COMMANDS.items()],
    ("train-epochs-not-a-number", ["train", *TINY, "--epochs", "abc"], 2),
    ("train-epochs-zero", ["train", *TINY, "--epochs", "0"], 2),
    ("evaluate-bad-device", ["evaluate", "--checkpoint", "GOOD", "--device", "tpu"], 2),
    ("evaluate-set-non-data-key", ["evaluate", "--checkpoint", "GOOD", "--set", "optim.lr=1"], 2),
    ("inspect-grads-batch-zero", ["inspect-grads", "-c", "SMOKE", "--batch-size", "0"], 2),
    ("inspect-grads-bad-loss", ["inspect-grads", "-c", "SMOKE", "--loss", "hinge"], 2),
    ("inspect-grads-bad-param", ["inspect-grads", "-c", "SMOKE", "--param", "nope.weight"], 2),
    ("losses-not-numbers", ["losses", "--input", "a,b", "--target", "1,2"], 2),
    ("losses-inf", ["losses", "--input", "inf,1", "--target", "1,2"], 2),
    ("losses-label-out-of-range", ["losses", "--label", "7"], 2),
    ("losses-input-without-target", ["losses", "--input", "1,2"], 2),
    ("compare-bad-loss", ["compare", "-c", "SMOKE", "--losses", "hinge"], 2),
    ("compare-bad-reduction", ["compare", "-c", "SMOKE", "--reductions", "avg"], 2),
    ("config-show-lr-not-a-number", ["config", "show", "--lr", "x"], 2),
    ("unknown-command", ["trian"], 2),
    ("unknown-root-option", ["--no-such-option"], 2),
    ("unknown-config-command", ["config", "bogus"], 2),
    ("set-without-value", ["config", "show", "--set"], 2),
    ("config-is-a-folder", ["config", "show", "-c", "EMPTY"], 2),
    *[(f"{name}-bad-config", [*argv, "-c", "BAD"], 2)
      for name, argv in COMMANDS.items() if name != "losses"],
    *[(f"{name}-missing-config", [*argv, "-c", "MISSING"], 2)
      for name, argv in COMMANDS.items() if name != "losses"],
    ("evaluate-no-checkpoint-there", ["evaluate", "--checkpoint", "MISSING_PT"], 2),
    ("evaluate-empty-run-dir", ["evaluate", "--checkpoint", "EMPTY"], 2),
    ("inspect-grads-no-checkpoint-there", ["inspect-grads", "--checkpoint", "MISSING_PT"], 2),
    ("train-resume-nothing-there", ["train", "--resume", "MISSING_PT"], 2),
    ("evaluate-corrupt-checkpoint", ["evaluate", "--checkpoint", "CORRUPT"], 1),
    ("inspect-grads-corrupt-checkpoint", ["inspect-grads", "--checkpoint", "CORRUPT"], 1),
    ("train-resume-corrupt-checkpoint", ["train", "--resume", "CORRUPT"], 1),
    ("train-missing-data", ["train", *TINY, *NO_DATA], 1),
    ("train-synthetic-beyond-memory", ["train", *TINY, "--set", "data.train_size=2000000000"], 1),
    ("evaluate-missing-data", ["evaluate", "--checkpoint", "GOOD", *NO_DATA], 1),
    ("compare-missing-data", ["compare", *TINY, "--losses", "ce", *NO_DATA], 1),
]  # fmt: skip


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("codes")
    result = Cli()("train", *TINY, "--epochs", "1", "--logdir", tmp / "runs", "--run-name", "g")
    assert result.exit_code == 0, result.stderr
    (tmp / "bad.yaml").write_text("data:\n  source: synthetic\n  mean: [.nan, 0.5, 0.5]\n")
    (tmp / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (tmp / "empty").mkdir()
    return {
        "SMOKE": str(SMOKE), "GOOD": str(tmp / "runs" / "g"), "BAD": str(tmp / "bad.yaml"),
        "MISSING": str(tmp / "missing.yaml"), "MISSING_PT": str(tmp / "nowhere" / "last.pt"),
        "EMPTY": str(tmp / "empty"), "CORRUPT": str(tmp / "corrupt.pt"),
    }  # fmt: skip


@pytest.mark.parametrize(("argv", "code"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_exit_codes_are_consistent(cli, places, tmp_path, argv, code):
    argv = [places.get(a, a) for a in argv]  # placeholders such as GOOD become real paths
    argv = [a.replace("data.root=EMPTY", f"data.root={places['EMPTY']}") for a in argv]
    if argv[0] in {"train", "compare"} and "--resume" not in argv:
        argv += ["--logdir", str(tmp_path / "runs")]
    result = cli(*argv)
    out, err = result.stdout, result.stderr
    assert result.exit_code == code, (result.exit_code, err, out)
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    # Ours and Click's own usage errors alike: one "error: " line, no usage box.
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Usage:" not in err and "╭" not in err, err
    if code == 2 and argv[0] in {"train", "compare"}:  # refused before anything is written
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
