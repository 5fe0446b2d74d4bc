"""Malformed submissions end in ONE line (no traceback) that names the file (and line), the
hook, the epoch and step where it failed, and what to do, and keep what was computed.

Each kind of mistake is a small module written to a temporary folder and trained on the
`smoke` suite through the training child's own protocol (`bench.worker.child_main`), in
process; one test goes through the real command line (child processes) and one through
`scripts/run_full_evaluation.py`, which goes on after a failing run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.config import RunSpec, load_suite, parse_defense_arg
from bench.records import load_checkpoint
from bench.runner import run_dir_for
from bench.worker import child_main, train

ROOT = Path(__file__).resolve().parents[1]
MARK = "# <-"  # marks the line a message must name

HEAD = """\
import torch
from torch import nn

from defenses.base import Defense, DefenseCard

"""
CARD = "    card = DefenseCard(name='Mine', paper='me')\n"


@dataclass
class Case:
    """A malformed submission: the module text (a line holding MARK is the line the
    message must name), the `--defense` tail, what the message must say."""

    source: str
    params: str = ""  # ':k=v' after the class name
    hook: str | None = None
    epoch: int | None = None  # the epoch (1-based) the run fails in, for runtime failures
    says: tuple[str, ...] = ()  # the problem and its remedy
    missing_file: bool = False
    kept_epoch: int = 0  # the last.pt that must survive (0: none)
    xfail: str = ""  # a known gap outside this file's reach (strict: fixing it shows)


CASES = {
    "01-syntax-error": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def after_attack(self, state)  " + MARK + "\n        pass\n",
        says=("SyntaxError", "fix the file")),
    "02-not-a-defense-subclass": Case(
        HEAD + "class Mine:  " + MARK + "\n" + CARD,
        says=("not a subclass of", "class Mine(Defense)")),
    "03-no-defense-card": Case(
        HEAD + "class Mine(Defense):  " + MARK + "\n    params = {}\n",
        says=("no DefenseCard", "add `card = DefenseCard(")),
    "04-wrong-hook-signature": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def before_attack(self):  " + MARK + "\n        pass\n",
        hook="before_attack", says=("should be before_attack(self, state)",)),
    "05-hook-raises": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def after_attack(self, state):\n"
        + "        if state.epoch == 1:\n"
        + "            raise ValueError('the proxy diverged')  " + MARK + "\n",
        hook="after_attack", epoch=2, kept_epoch=1,
        says=("ValueError: the proxy diverged", "run the same command again to resume")),
    "06-nan-loss": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def add_losses(self, state):  " + MARK + "\n"
        + "        scale = float('nan') if state.epoch == 1 else 0.0\n"
        + "        return {'evil': state.per_sample_loss.mean() * scale}\n",
        hook="add_losses", epoch=2, kept_epoch=1,
        says=("non-finite", "mine.evil", "last.pt")),
    "07-sample-weights-shape": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def sample_weights(self, state):  " + MARK + "\n"
        + "        return torch.ones(3)\n",
        hook="sample_weights", epoch=1,
        says=("returned (3,)", "expected a floating-point tensor of shape (64,)",
              "fix the defense and run the same command again")),
    "08a-eval-models-other-architecture": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    extra_models = ('ema',)\n"
        + "    def eval_models(self, state):  " + MARK + "\n"
        + "        if state.epoch < 2:\n"
        + "            return {'ema': state.model}\n"
        + "        return {'ema': nn.Linear(4, 2)}\n",
        hook="eval_models", kept_epoch=1,
        says=("not of the suite's architecture", "at the checkpoint after epoch 2 (step 8)",
              "kept: the checkpoint after epoch 1", "run the same command again to resume")),
    "08b-eval-models-undeclared-name": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def eval_models(self, state):  " + MARK + "\n"
        + "        return {'ema': state.model}\n",
        hook="eval_models",
        says=("does not declare", "list the names of its extra models in `extra_models`",
              "at the checkpoint after epoch 1 (step 4)", "nothing of this run was kept")),
    "09-missing-dependency": Case(
        HEAD + "import nonexistent_pkg_xyz  " + MARK + "\n\n"
        + "class Mine(Defense):\n" + CARD,
        says=("nonexistent_pkg_xyz", "not installed", "pip install")),
    "10-unknown-parameter": Case(
        HEAD + "class Mine(Defense):\n" + CARD + "    params = {'strength': 0.5}\n"
        + "    def __init__(self, strength):\n"
        + "        super().__init__(strength=strength)\n",
        params=":nope=1", says=("no parameter(s) ['nope']", "valid parameters are ['strength']")),
    "11-invalid-parameter-value": Case(
        HEAD + "class Mine(Defense):\n" + CARD + "    params = {'strength': 0.5}\n"
        + "    def __init__(self, strength):\n"
        + "        if strength < 0:\n"
        + "            raise ValueError(f'strength must be >= 0, got {strength}')  " + MARK
        + "\n        super().__init__(strength=strength)\n",
        params=":strength=-1",
        says=("ValueError: strength must be >= 0, got -1", "pass values it accepts")),
    "12-nonexistent-file": Case(
        "", missing_file=True, says=("does not exist", "check the path")),
    "13-detached-output": Case(
        HEAD + "class Mine(Defense):\n" + CARD
        + "    def add_losses(self, state):  " + MARK + "\n"
        + "        with torch.no_grad():\n"
        + "            term = state.per_sample_loss.mean()\n"
        + "        return {'reg': 0.1 * term}\n",
        hook="add_losses", epoch=1,
        says=("term 'reg' is detached", "without torch.no_grad()")),
}


def marked_line(source: str) -> int | None:
    for number, line in enumerate(source.splitlines(), 1):
        if MARK in line:
            return number
    return None


def train_payload(spec: RunSpec, results: Path) -> dict:
    """What `bench.runner.train_in_child` sends the training process."""
    return {"spec": spec.to_dict(), "suite": load_suite("smoke").to_dict(),
            "results": str(results), "data_root": None, "device": "cpu", "threads": 1,
            "progress": False}


def fail_in_child(module: Path, params: str, results: Path,
                  tmp: Path) -> tuple[int, str, RunSpec]:
    """Train `module:Mine` as the training process does; its exit status and error file."""
    spec = RunSpec("smoke", "at", (parse_defense_arg(f"{module}:Mine{params}"),), 0)
    error_file = tmp / "error.txt"
    status = child_main(lambda: train(train_payload(spec, results)), str(error_file),
                        debug=False)
    return status, (error_file.read_text() if error_file.exists() else ""), spec


@pytest.mark.parametrize("kind", [
    pytest.param(kind, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)]
                 if case.xfail else []) for kind, case in CASES.items()])
def test_a_malformed_submission_ends_in_one_clear_line(kind, tmp_path):
    case = CASES[kind]
    module = tmp_path / "mine.py"
    if not case.missing_file:
        module.write_text(case.source)
    results = tmp_path / "results"
    status, text, spec = fail_in_child(module, case.params, results, tmp_path)
    assert status == 2
    assert text.endswith("\n") and len(text.splitlines()) == 1, text
    message = text.strip()
    assert "Traceback" not in message
    for words in case.says:  # the problem and what to do
        assert words in message
    if case.epoch:
        assert f"epoch {case.epoch}" in message and "step " in message
    run_dir = run_dir_for(spec, results)
    if case.kept_epoch:  # nothing already computed is lost
        assert load_checkpoint(run_dir / "last.pt")["epoch"] == case.kept_epoch
        assert str(run_dir / "last.pt") in message
    else:
        assert not (run_dir / "last.pt").exists()
    line = marked_line(case.source)
    assert (f"{module}:{line}" if line else str(module)) in message
    if case.hook:
        assert case.hook in message


RAISES_AT_EPOCH_2 = (
    HEAD + "class Mine(Defense):\n" + CARD
    + "    def after_attack(self, state):\n"
    + "        if state.epoch == 1:\n"
    + "            raise ValueError('the proxy diverged')\n")


def test_the_command_line_prints_one_line_and_the_traceback_only_under_debug(tmp_path, capfd):
    from bench.cli import main
    from bench.errors import RunFailedError

    module = tmp_path / "mine.py"
    module.write_text(RAISES_AT_EPOCH_2)
    argv = ["run", "--suite", "smoke", "--defense", f"{module}:Mine", "--results",
            str(tmp_path / "results"), "--quiet", "--threads", "1"]
    assert main(argv) == 2
    err = capfd.readouterr().err  # the children's stderr too
    assert len(err.splitlines()) == 1 and err.startswith("robench: error: "), err
    assert "Traceback" not in err
    assert f"{module}:" in err and "after_attack at epoch 2" in err
    assert "kept: the checkpoint after epoch 1" in err
    # under --debug the run resumes from that checkpoint, fails again, and shows where
    with pytest.raises(RunFailedError, match="after_attack at epoch 2"):
        main([*argv, "--debug"])
    err = capfd.readouterr().err
    assert "Traceback" in err and "raise ValueError('the proxy diverged')" in err


def test_the_full_evaluation_goes_on_after_a_failing_defense(tmp_path):
    module = tmp_path / "broken.py"
    module.write_text(HEAD + "class Broken(Defense):\n" + CARD
                      + "    def before_attack(self, state):\n"
                      + "        raise RuntimeError('not implemented yet')\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "run_full_evaluation.py"), "--suite", "smoke",
           "--defenses", f"{module}:Broken,awp", "--results", str(tmp_path / "results"),
           "--threads", "1", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "AT+Broken" in line]
    failure = next(line for line in lines if line.startswith(
        "run_full_evaluation: error in AT+Broken seed 0: "))
    assert f"{module}:" in failure and "in before_attack at epoch 1, step 0" in failure
    assert "RuntimeError: not implemented yet" in failure
    assert "1 of 3 run(s) failed: AT+Broken seed 0" in done.stderr
    rows = {json.loads(p.read_text())["row_name"]
            for p in (tmp_path / "results").glob("smoke/*/record.json")}
    assert rows == {"AT", "AT+AWP"}
    assert "AT+AWP" in (tmp_path / "results" / "leaderboard" / "leaderboard.md").read_text()
