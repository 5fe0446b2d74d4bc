"""Suite hashes: what invalidates a run and what splits a leaderboard."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.config import RunSpec, list_suites, load_suite, parse_suite
from bench.engine import RunMismatchError
from bench.runner import run_dir_for, run_one

BASE = """
name = "h"
description = "{description}"
# {comment}
seeds = [0]
[data]
dataset = "synthetic"
[model]
name = "small_cnn"
[train]
epochs = {epochs}
{overrides}
"""


def suite(description="d", comment="c", epochs=2, overrides=""):
    text = BASE.format(description=description, comment=comment, epochs=epochs,
                       overrides=overrides)
    return parse_suite(text, "h", "test")


def test_comments_description_and_defense_tables_do_not_change_the_protocol():
    base = suite()
    assert suite(description="other", comment="edited").protocol_hash == base.protocol_hash
    tuned = suite(overrides="[defenses.dom_re]\ntau = 0.3")
    assert tuned.protocol_hash == base.protocol_hash
    assert suite(epochs=3).protocol_hash != base.protocol_hash


def test_a_defense_table_invalidates_only_that_defense_s_runs():
    base, tuned = suite(), suite(overrides="[defenses.dom_re]\ntau = 0.3")
    assert tuned.run_hash([]) == base.run_hash([])
    assert tuned.run_hash(["awp"]) == base.run_hash(["awp"])
    assert tuned.run_hash(["dom_re"]) != base.run_hash(["dom_re"])
    assert tuned.overrides_for(["dom_re", "awp"]) == {"dom_re": {"tau": 0.3}}


@pytest.mark.parametrize("name", list_suites())
def test_every_shipped_suite_loads(name):
    loaded = load_suite(name)
    assert loaded.methods and len(loaded.protocol_hash) == 64


def test_a_finished_run_from_another_suite_version_is_refused(tmp_path):
    smoke = load_suite("smoke")
    spec = RunSpec("smoke", "at", (), 0)
    record = run_one(spec, tmp_path, progress=False, suite=smoke).record_path
    assert run_one(spec, tmp_path, progress=False, suite=smoke).seconds == 0.0  # reused
    doc = json.loads(record.read_text())
    doc["suite"]["run_hash"] = "0" * 64
    record.write_text(json.dumps(doc))
    with pytest.raises(RunMismatchError, match="another version of suite 'smoke'"):
        run_one(spec, tmp_path, progress=False, suite=smoke)
    shutil.rmtree(run_dir_for(spec, tmp_path))
