"""`robench check` (bench/check.py), the submission gate: a good defense passes every
check; each kind of mistake fails the check made for it, with a one-line reason, and the
command exits non-zero."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.cli import main

HEAD = """\
import contextlib
import copy

import torch

from defenses.base import Defense, DefenseCard

"""
FULL_CARD = ("    card = DefenseCard(name='Mine', paper='A paper', venue='Nowhere 2025',\n"
             "                       link='https://example.org/mine', extra_data='none')\n")

GOOD = HEAD + """\
class Mine(Defense):
    card = FULL_CARD
    params = {'strength': 0.01, 'decay': 0.9}
    extra_models = ('ema',)

    def __init__(self, strength, decay):
        super().__init__(strength=strength, decay=decay)
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))

    def setup(self, state):
        self.ema = copy.deepcopy(state.model).requires_grad_(False)

    def add_losses(self, state):
        return {'logit_norm': self.hparams['strength'] * state.logits.pow(2).mean()}

    def after_step(self, state):
        self.steps += 1
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), state.model.parameters()):
                e.lerp_(p, 1 - self.hparams['decay'])

    def eval_models(self, state):
        return {'ema': self.ema}
""".replace("    card = FULL_CARD\n", FULL_CARD)

ROW = re.compile(r"^(?P<check>\S.*?)\s{2,}(?P<verdict>ok|FAIL)(?:\s{2,}(?P<detail>.*))?$")


def run_check(tmp_path, source: str, capsys, *options: str) -> tuple[int, dict, str]:
    """`robench check FILE:Mine`: its exit status, {check: (verdict, reason)}, the output."""
    module = tmp_path / "mine.py"
    module.write_text(source)
    status = main(["check", f"{module}:Mine", *options])
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows = {}
    for line in lines[:-1]:
        match = ROW.match(line)
        assert match, f"not a table row: {line!r}"
        rows[match["check"]] = (match["verdict"], match["detail"] or "")
    assert re.fullmatch(r"\d+ of \d+ checks passed( \(static checks only\))?", lines[-1])
    return status, rows, out


def reason_patterns(source: str, reasons: list[str]) -> list[str]:
    """The reasons (regular expressions), `{line}` being the line marked `# <-`."""
    line = next((n for n, text in enumerate(source.splitlines(), 1) if "# <-" in text), None)
    return [r.replace("{line}", str(line)) for r in reasons]


def failed(rows: dict) -> dict[str, str]:
    return {check: reason for check, (verdict, reason) in rows.items() if verdict == "FAIL"}


STATIC = ["importable", "Defense subclass", "card complete", "params match __init__",
          "hook signatures", "slots, capabilities, methods"]
DYNAMIC = ["trains with a finite loss [at]", "extra models load in the evaluator [at]",
           "weights clean outside around_update [at]", "resume equals uninterrupted [at]"]


def test_a_good_file_based_defense_passes_every_check(tmp_path, capsys):
    status, rows, out = run_check(tmp_path, GOOD, capsys)
    assert status == 0, out
    assert list(rows) == STATIC + DYNAMIC and not failed(rows), out
    assert "['mine.ema'] load as the suite's architecture" in rows[DYNAMIC[1]][1]
    assert out.splitlines()[-1] == f"{len(rows)} of {len(rows)} checks passed"


def test_static_only_skips_the_training(tmp_path, capsys):
    status, rows, out = run_check(tmp_path, GOOD, capsys, "--static-only")
    assert status == 0
    assert list(rows) == STATIC
    assert out.splitlines()[-1] == "6 of 6 checks passed (static checks only)"
    assert not list(tmp_path.rglob("*.pt"))


def test_a_built_in_defense_passes(capsys):
    assert main(["check", "hr"]) == 0, capsys.readouterr().out
    assert "FAIL" not in capsys.readouterr().out


def mine(body: str, card: str = FULL_CARD, head: str = "class Mine(Defense):\n") -> str:
    return HEAD + head + card + body


# kind -> (the module, the one check it must fail, words of the one-line reason)
STATIC_MISTAKES = {
    "syntax-error": (
        mine("    def after_attack(self, state)  # <-\n        pass\n"),
        "importable", [r"mine\.py:{line}: SyntaxError", "fix the file"]),
    "incomplete-card": (
        mine("", card="    card = DefenseCard(name='Mine', paper='A paper')\n"),
        "card complete", ["card.venue is empty", "card.link is empty"]),
    "params-not-matching-init": (
        mine("    params = {'strength': 0.1, 'unused': 1}\n"
             "    def __init__(self, strength, beta):\n"
             "        super().__init__(strength=strength, beta=beta)\n"),
        "params match __init__",
        [r"params \['unused'\] are not parameters of __init__",
         r"__init__ needs \['beta'\], which have no default in params"]),
    "wrong-hook-signature": (
        mine("    def before_attack(self):  # <-\n        pass\n"),
        "hook signatures",
        [r"before_attack\(self\) at .*mine\.py:{line} should be before_attack\(self, state\)"]),
    "unknown-slot-and-capability": (
        mine("    slots = ('optimizer',)\n    capabilities = ('telepathy',)\n"),
        "slots, capabilities, methods",
        [r"slots \('optimizer',\): each must be one of \['objective'",
         r"capabilities \('telepathy',\): each must be one of"]),
}


def assert_only_check_fails(tmp_path, capsys, source, check, reasons):
    """`robench check` on `source` exits non-zero, fails exactly `check`, and gives its reasons."""
    status, rows, out = run_check(tmp_path, source, capsys)
    assert status != 0
    assert set(failed(rows)) == {check}, out
    for reason in reason_patterns(source, reasons):
        assert re.search(reason, failed(rows)[check]), out
    return rows, out


@pytest.mark.parametrize("kind", list(STATIC_MISTAKES))
def test_a_static_mistake_fails_its_check(kind, tmp_path, capsys):
    source, check, reasons = STATIC_MISTAKES[kind]
    rows, out = assert_only_check_fails(tmp_path, capsys, source, check, reasons)
    assert not any(name.endswith("[at]") for name in rows)  # nothing was trained


PERTURB = """\
    def _shift(self, state, sign):
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(sign * 0.01 * p.abs().max())
"""
DYNAMIC_MISTAKES = {
    # the perturbation is undone after the step, but the update does not see clean weights
    "perturbs-before-around-update": (
        mine(PERTURB + "    def after_attack(self, state):\n        self._shift(state, 1)\n"
             "    def after_step(self, state):\n        self._shift(state, -1)\n"),
        "weights clean outside around_update [at]",
        [r"on entering around_update \(changed before it\)", "perturb the weights only inside "
         "around_update and restore them on leaving it"]),
    # the update sees clean weights, but the attack does not
    "perturbs-in-before-attack-and-restores-in-after-attack": (
        mine(PERTURB + "    def before_attack(self, state):\n        self._shift(state, 1)\n"
             "    def after_attack(self, state):\n        self._shift(state, -1)\n"),
        "weights clean outside around_update [at]",
        [r"after the attack \(changed in before_attack, before around_update\)"]),
    "perturbs-in-around-update-and-never-restores": (
        mine(PERTURB + "    @contextlib.contextmanager\n"
             "    def around_update(self, state):\n"
             "        self._shift(state, 1)\n"
             "        yield\n"),
        "weights clean outside around_update [at]",
        [r"after the previous step \(outside around_update\)", "restore them on leaving it"]),
    # a counter in a plain attribute: it restarts at 0 on resume, so epoch 2 differs
    "state-not-checkpointed": (
        mine("    def __init__(self):\n"
             "        super().__init__()\n"
             "        self.steps = 0\n"
             "    def after_step(self, state):\n"
             "        self.steps += 1\n"
             "    def add_losses(self, state):\n"
             "        weight = 0.5 if self.steps >= state.batches_per_epoch else 0.0\n"
             "        return {'late': weight * state.per_sample_loss.mean()}\n"),
        "resume equals uninterrupted [at]",
        ["after resuming differs from the uninterrupted run", "keep all state in buffers"]),
    "raises-in-a-hook": (
        mine("    def after_step(self, state):\n"
             "        raise ZeroDivisionError('division by zero')  # <-\n"),
        "trains with a finite loss [at]",
        [r"defense 'mine' \(.*mine\.py:{line}\) in after_step at epoch 1, step 0 of AT\+Mine "
         r"seed 0: ZeroDivisionError: division by zero; nothing of this run was kept yet"]),
}


@pytest.mark.parametrize("kind", list(DYNAMIC_MISTAKES))
def test_a_dynamic_mistake_fails_its_check(kind, tmp_path, capsys):
    source, check, reasons = DYNAMIC_MISTAKES[kind]
    rows, out = assert_only_check_fails(tmp_path, capsys, source, check, reasons)
    assert all(rows[name][0] == "ok" for name in STATIC), out


def test_the_readme_example_passes_the_gate(tmp_path, capsys):
    """The worked example in README.md (section "Submitting a defense") is a valid submission
    as written, checked twice in one process (a file is imported once per content)."""
    from bench.check import check_defense

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("# my_defense.py\n", 1)[1].split("```", 1)[0]
    module = tmp_path / "my_defense.py"
    module.write_text(example)
    assert check_defense(f"{module}:CleanMix") == 0
    assert check_defense(f"{module}:CleanMix:beta=1", dynamic=False) == 0
    assert "10 of 10 checks passed" in capsys.readouterr().out
