"""`robench cost --suite S`: training cost ratios that do not depend on the machine's load.

A run's own seconds depend on what else the machine was doing: on 2 cores, a second job
made a defense's run take 16 minutes instead of 1.5, and with more runnable threads than
cores OpenMP threads spin, so even process CPU seconds grow with the load. Ratios measured
side by side do not: this command times every row of the suite (the same plan as
`robench board`, seed 0) in ONE process (`bench/cost_probe.py`), one block of training
steps per row in turn, for several rounds, each round in a rotated order. Whatever load
the machine carries falls on every row alike within a round; each round gives one ratio
per row (its block's seconds over the base row's), and the median over rounds is
written. The launcher reads the clock around each block, outside the process that runs
defense code. On the CPU the process uses one thread by default (no waiting threads to
spin).

A row whose defenses use the clean model (a warm start) is charged the `standard` method's
seconds per epoch times the clean model's epochs over the run's epochs, as the leaderboard
charges the extra pretraining in full to every run that uses it.

The result, `results/<suite>/cost.json`, is what the leaderboard's cost column shows
for the suite's current version (rows it does not cover show "–" until it is measured
again); the runs keep their own seconds, as information.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.config import RunSpec, Suite, load_suite
from bench.errors import RunFailedError
from bench.records import write_json_atomic
from bench.runner import Launch, child_environment, plan_in_child
from leaderboard.tables import BASE_METHODS  # the same base row as the leaderboard's column

COST_FILE = "cost.json"
FORMAT = 1


def cost_path(results: Path, suite_name: str) -> Path:
    return Path(results) / suite_name / COST_FILE


def base_index(specs: list[RunSpec]) -> int:
    """The row the ratios divide by: the plain method first in BASE_METHODS."""
    for method in BASE_METHODS:
        for i, spec in enumerate(specs):
            if spec.method == method and not spec.defenses:
                return i
    raise RunFailedError("no plain method row to divide by: plan at least one of "
                         f"{', '.join(BASE_METHODS)} without defenses")


class ProbeProcess:
    """The cost probe child: a block per command, timed here."""

    def __init__(self, payload: dict, launch: Launch) -> None:
        fd, self.error_file = tempfile.mkstemp(prefix="robench-error-", suffix=".txt")
        os.close(fd)
        command = [sys.executable, "-m", "bench.worker", "cost", "--error-file",
                   self.error_file] + (["--debug"] if launch.debug else [])
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=child_environment(launch.threads))
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        self.ready = self._answer("ready")

    def _answer(self, word: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                message = Path(self.error_file).read_text().strip() or (
                    f"the cost process exited with status {self.proc.returncode}")
                raise RunFailedError(f"timing the rows: {message}")
            if line.startswith(word):
                return line[len(word):].strip()

    def time_block(self, index: int) -> float:
        start = time.perf_counter()
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        self._answer("done")
        return time.perf_counter() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)
        os.unlink(self.error_file)


def measure_cost(suite_name: str, defenses: list[str] | None, methods: list[str] | None,
                 launch: Launch, steps: int | None = None, rounds: int = 5,
                 say=print) -> dict:
    """Time every row of the plan alternately; return the cost document (see module)."""
    suite = load_suite(suite_name)
    specs = plan_in_child(suite_name, defenses, methods, [suite.seeds[0]], launch)
    standard = RunSpec(suite.name, "standard", (), suite.seeds[0])
    probes = [*specs, standard]  # the last one prices the clean model
    payload = {"suite": suite.to_dict(), "specs": [s.to_dict() for s in probes],
               "steps": steps, "data_root": launch.data_root, "device": launch.device,
               "threads": launch.threads}
    say(f"cost of {len(specs)} rows of {suite.name}: building them, then {rounds} rounds "
        "of one block each, in turn")
    probe = ProbeProcess(payload, launch)
    try:
        info = json.loads(probe.ready)
        blocks: list[list[float]] = []
        for r in range(rounds):
            order = list(range(len(probes)))
            order = order[r % len(order):] + order[:r % len(order)]
            if r % 2:
                order.reverse()
            times = [0.0] * len(probes)
            for i in order:
                times[i] = probe.time_block(i)
            blocks.append(times)
            say(f"  round {r + 1}/{rounds}: {sum(times):.1f} s")
    finally:
        probe.close()
    return cost_document(suite, specs, blocks, info, rounds)


def cost_document(suite: Suite, specs: list[RunSpec], blocks: list[list[float]],
                  info: dict, rounds: int) -> dict:
    """Per round: seconds per epoch of each row (its block scaled to an epoch, plus the
    clean model's share where it uses one), divided by the base row's; medians over
    rounds. `blocks[r][i]`: seconds of row i's block in round r (the last row is the
    `standard` method, the clean model's price)."""
    base = base_index(specs)
    per_epoch = info["batches_per_epoch"] / (info["steps"] * info["phases"])
    clean_epochs = info.get("clean_model_epochs", {})  # per row, its recipes' epochs
    rows = []
    for i, spec in enumerate(specs):
        seconds = []
        for times in blocks:
            own = times[i] * per_epoch
            if i in info["clean_model_rows"]:
                epochs = clean_epochs.get(str(i), suite.clean_model_epochs)
                own += times[-1] * per_epoch * epochs / suite.train.epochs
            seconds.append(own)
        passes = _passes_per_epoch(info, i, per_epoch, suite)
        rows.append({"row": spec.row_name, "spec": spec.to_dict(),
                     "defense_params": info["defense_params"][i],
                     "run_hash": suite.run_hash(spec.defense_names),
                     "clean_model": i in info["clean_model_rows"],
                     "seconds_per_epoch": statistics.median(seconds), "per_round": seconds,
                     **({"passes_per_epoch": passes} if passes else {})})
    for row in rows:
        ratios = [s / b for s, b in zip(row["per_round"], rows[base]["per_round"])]
        row["ratio"] = statistics.median(ratios)
        row["ratio_per_round"] = ratios
        if "passes_per_epoch" in row and "passes_per_epoch" in rows[base]:
            predicted = _pass_total(row) / _pass_total(rows[base])
            row["passes_ratio"] = predicted
            row["cost_over_passes"] = row["ratio"] / predicted
    return {"format": FORMAT, "suite": suite.name, "protocol_hash": suite.protocol_hash,
            "base": specs[base].row_name, "rounds": rounds, "steps": info["steps"],
            "phases": info["phases"], "batches_per_epoch": info["batches_per_epoch"],
            "device": info["device"], "threads": info["threads"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rows": rows}


def _passes_per_epoch(info: dict, i: int, per_epoch: float, suite: Suite) -> dict | None:
    """Row i's forward and backward passes per epoch (its block's, scaled to an epoch, plus
    the clean model's share where it uses one, priced like its seconds); None when the
    probe did not report passes."""
    passes = info.get("passes")
    if not passes:
        return None
    scale = {key: passes[i].get(key, 0) * per_epoch
             for key in ("forward", "backward", "input_backward")}
    if i in info["clean_model_rows"]:
        epochs = info.get("clean_model_epochs", {}).get(str(i), suite.clean_model_epochs)
        for key in scale:
            scale[key] += passes[-1].get(key, 0) * per_epoch * epochs / suite.train.epochs
    return scale


def _pass_total(row: dict) -> float:
    """What the passes predict of a row's cost, in forward-pass units: a forward 1, a
    backward with input gradients only (an attack's) 1, a backward that also computes
    weight gradients (training, weight perturbations) 2 (`PassCounter.work`)."""
    p = row["passes_per_epoch"]
    return p["forward"] + p["input_backward"] + 2 * (p["backward"] - p["input_backward"])


def write_cost(document: dict, results: Path) -> Path:
    path = cost_path(results, document["suite"])
    write_json_atomic(path, document)
    return path


def cost_table(document: dict) -> str:
    """The measured ratios, with what the passes predict (`passes`: the row's passes in
    forward units, `PassCounter.work`, over the base row's) and the measured ratio over
    that prediction
    (`/passes`: 1 when the extra cost is all in model passes; above 1 for work outside
    them, e.g. augmentation, per-parameter updates, host syncs)."""
    lines = [f"{'row':28s} {'s/epoch':>9s} {'vs ' + document['base']:>9s} {'passes':>7s} "
             f"{'/passes':>7s}  per round"]
    for row in document["rows"]:
        rounds = " ".join(f"{r:.2f}" for r in row["ratio_per_round"])
        predicted = (f"{row['passes_ratio']:6.2f}x {row['cost_over_passes']:7.2f}"
                     if "passes_ratio" in row else f"{'–':>7s} {'–':>7s}")
        lines.append(f"{row['row']:28s} {row['seconds_per_epoch']:9.3f} "
                     f"{row['ratio']:8.2f}x {predicted}  {rounds}")
    return "\n".join(lines)
