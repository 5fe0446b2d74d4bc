"""The process that `robench cost` times (`python -m bench.worker cost`); not a user command.

It builds one engine per row of the plan (seed 0, the suite's data, a throwaway folder),
runs each defense's `setup` (a defense that asks for a clean model gets an untrained
network of the suite's architecture: the weights do not change the work), prints `ready`,
and then answers commands on its standard input, one per line:

    <row index>   run that row's block, print `done` when finished
    quit          exit

A block is, for each phase of training (by default the epochs at 5%, 35%, 65% and 95% of
the run, so that defenses that start late or change over the run are timed in every
regime): `on_epoch_start`, `steps` training steps of the engine (attack, hooks, update) and
`on_epoch_end`. The launcher, not this process, reads the clock around each command, so
code in this process (defense code included) cannot change the time it is charged.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

PHASES = (0.05, 0.35, 0.65, 0.95)
DEFAULT_STEPS = 20  # per phase, or one epoch when an epoch is shorter


class RowProbe:
    def __init__(self, spec, suite, splits, folder: Path, device, steps: int,
                 phases: tuple[float, ...]) -> None:
        from bench.engine import Trainer

        self.trainer = Trainer(spec, suite, splits, folder, device=device, progress=False)
        self.state = self.trainer.build()
        batches = self.state.batches_per_epoch
        self.steps = min(steps, batches) if steps else min(batches, DEFAULT_STEPS)
        self.phases = phases
        self.batches = iter(self.trainer.loader)
        trainer, state = self.trainer, self.state
        self.uses_clean_model = any("clean_model" in d.capabilities for d in trainer.defenses)
        # epochs of standard training the row's clean models cost (one per recipe)
        self.clean_model_epochs = sum(how.epochs(suite) for how in dict.fromkeys(
            d.clean_model_recipe for d in trainer.defenses if "clean_model" in d.capabilities))
        if self.uses_clean_model:
            state.clean_model = trainer._fresh_model().eval().requires_grad_(False)
        for defense in trainer.defenses:
            trainer.guard.call(defense, "setup", state)
        state.clean_model = None

    def _next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.trainer.loader)
            return next(self.batches)

    def block(self) -> dict[str, int]:
        """Run the row's block; returns the forward and backward passes it counted."""
        trainer, state = self.trainer, self.state
        counter = state.counter
        before = (counter.forward, counter.backward, counter.input_backward)
        epochs = trainer.suite.train.epochs
        for phase in self.phases:
            state.epoch = min(epochs - 1, int(phase * epochs))
            state.step = state.epoch * state.batches_per_epoch
            trainer.model.train()
            for defense in trainer.defenses:
                trainer.guard.call(defense, "on_epoch_start", state)
            loss = None
            for _ in range(self.steps):
                x, y, index = self._next_batch()
                loss = trainer.train_step(state, x, y, index)
                state.step += 1
            if loss is not None:
                float(loss.detach())  # wait for the device
            for defense in trainer.defenses:
                trainer.guard.call(defense, "on_epoch_end", state)
            state.pop_logs()
        if state.device.type == "cuda":
            import torch

            torch.cuda.synchronize(state.device)
        return {"forward": counter.forward - before[0], "backward": counter.backward - before[1],
                "input_backward": counter.input_backward - before[2]}


def serve(payload: dict) -> None:
    import torch

    from bench.config import RunSpec, Suite
    from bench.curves import pick_device
    from bench.data import build_splits
    from bench.worker import validate_spec

    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    suite = Suite.from_dict(payload["suite"])
    specs = [RunSpec.from_dict(raw) for raw in payload["specs"]]
    for spec in specs:
        validate_spec(spec, suite)
    device = pick_device(payload.get("device"))
    splits = build_splits(suite.data, payload.get("data_root"), suite.curves.size)
    phases = tuple(payload.get("phases") or PHASES)
    with tempfile.TemporaryDirectory(prefix="robench-cost-") as folder:
        probes = [RowProbe(spec, suite, splits, Path(folder) / f"row{i}", device,
                           int(payload.get("steps") or 0), phases) for i, spec in enumerate(specs)]
        # warm-up: first calls allocate and pick kernels; the passes of each row's block
        passes = [probe.block() for probe in probes]
        info = {"batches_per_epoch": probes[0].state.batches_per_epoch,
                "steps": probes[0].steps, "phases": len(phases),
                "clean_model_rows": [i for i, p in enumerate(probes) if p.uses_clean_model],
                "clean_model_epochs": {str(i): p.clean_model_epochs
                                       for i, p in enumerate(probes) if p.uses_clean_model},
                "defense_params": [{d.name: dict(d.hparams) for d in p.trainer.defenses}
                                   for p in probes],
                "passes": passes,
                "device": str(device), "threads": torch.get_num_threads()}
        print("ready " + json.dumps(info), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            probes[int(command)].block()
            print("done", flush=True)
