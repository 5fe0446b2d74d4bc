"""Final evaluation of a finished run and its `record.json`.

For every model in `eval_models`, at the best and at the last checkpoint, in
`eval()` mode and fp32: clean accuracy, PGD-20 (CE, step eps/4, random start),
CW-inf-20 (margin loss) and AutoAttack (official `pyautoattack`), on the suite's
evaluation set. Sanity flags: AutoAttack's own warnings, PGD at a huge epsilon
must reach ~0, more PGD steps must not raise accuracy, a large
PGD-vs-AutoAttack gap, and clean accuracy near chance (the model did not train).
The record also carries `catastrophic_overfitting`: None, or the first epoch flagged
by `bench.overfitting` from the per-epoch curves (checked only for runs with the FGSM
curve, i.e. on the single-step suites).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from attacks.autoattack import run_autoattack
from attacks.pgd import clean_accuracy, pgd, robust_accuracy
from bench.config import RunSpec, Suite
from bench.data import Splits
from bench.engine import Trainer, collect_eval_models, derive_seed, pick_device
from bench.overfitting import FGSM_KEY, catastrophic_overfitting_field
from bench.overfitting import RULE_KEY as CO_RULE_KEY
from bench.overfitting import RULE_VERSION as CO_RULE_VERSION
from bench.records import (
    RecordError,
    device_description,
    load_checkpoint,
    read_history,
    software_versions,
    write_json_atomic,
)

HUGE_EPS = 0.5  # PGD at this radius must drive accuracy to ~0
HUGE_EPS_MAX_ACC = 0.05
AA_GAP_FLAG = 0.10  # PGD-20 minus AutoAttack above this fires a flag
NEAR_CHANCE_MARGIN = 0.05  # clean accuracy at most 1/classes + this: the model did not train
SANITY_IMAGES = 100


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: Suite,
                   seed: int, label: str, progress: bool,
                   num_classes: int) -> tuple[dict, list[dict], dict]:
    """Metrics (fractions), fired sanity flags and AutoAttack details of one model."""
    e, eps = suite.eval, suite.train.eps
    device = x.device
    model.eval()
    flags: list[dict] = []
    bar = (lambda name: f"{label} {name}") if progress else (lambda name: None)
    metrics: dict = {"n": len(y)}
    metrics["clean"] = clean_accuracy(model, x, y, batch_size=e.batch_size)
    if metrics["clean"] <= 1 / num_classes + NEAR_CHANCE_MARGIN:
        flags.append({"check": "near_chance", "message": (
            f"clean accuracy {metrics['clean']:.3f} is within {NEAR_CHANCE_MARGIN:.2f} of "
            f"chance (1/{num_classes}): the model did not learn, so its robust accuracy and "
            "best-to-last gap say nothing about robust overfitting")})
    pgd_correct = correct_under_pgd(model, x, y, eps, e.pgd_step_ratio * eps, e.pgd_steps,
                                    e.batch_size, _seeded(seed, device), bar("PGD-20"))
    metrics["pgd20"] = pgd_correct.float().mean().item()
    metrics["cw20"] = robust_accuracy(
        model, x, y, eps=eps, step_size=e.pgd_step_ratio * eps, steps=e.cw_steps, loss="cw",
        batch_size=e.batch_size, generator=_seeded(seed + 1, device), progress=bar("CW-20"))
    aa_info: dict = {"version": e.autoattack}
    if e.autoattack != "none":
        if progress:
            print(f"  {label}: AutoAttack ({e.autoattack}) on "
                  f"{min(e.autoattack_size or len(y), len(y))} images ...", flush=True)
        n_aa = e.autoattack_size or len(y)
        result = run_autoattack(model, x[:n_aa], y[:n_aa], eps=eps, version=e.autoattack,
                                batch_size=e.batch_size, device=device, seed=seed)
        metrics["autoattack"] = result.robust_accuracy
        metrics["n_autoattack"] = min(n_aa, len(y))
        aa_info.update({"seconds": result.seconds, "settings": result.settings,
                        "warnings": result.warnings, "log": result.log})
        for message in dict.fromkeys(result.warnings):  # each distinct warning once
            flags.append({"check": "autoattack_warning", "message": message})
        pgd_on_aa_images = pgd_correct[:n_aa].float().mean().item()
        if pgd_on_aa_images - result.robust_accuracy > AA_GAP_FLAG:
            flags.append({"check": "aa_pgd_gap", "message": (
                f"PGD-20 {pgd_on_aa_images:.3f} exceeds AutoAttack "
                f"{result.robust_accuracy:.3f} by more than {AA_GAP_FLAG:.2f}: "
                "possible gradient masking")})
    else:
        metrics["autoattack"] = None
    if e.sanity_checks:
        flags += sanity_flags(model, x[:SANITY_IMAGES], y[:SANITY_IMAGES],
                              pgd_correct[:SANITY_IMAGES], suite, seed)
    return metrics, flags, aa_info


def correct_under_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      step_size: float, steps: int, batch_size: int,
                      generator: torch.Generator, progress: str | None = None) -> torch.Tensor:
    """Per-image correctness (bool) under random-start PGD with the CE loss."""
    starts = range(0, len(y), batch_size)
    if progress is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, leave=False)
    out = []
    for i in starts:
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_adv = pgd(model, xb, yb, eps=eps, step_size=step_size, steps=steps, generator=generator)
        with torch.no_grad():
            out.append(model(x_adv).argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)


def sanity_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pgd_correct: torch.Tensor,
                 suite: Suite, seed: int) -> list[dict]:
    """Cheap checks on a few images: PGD at a huge radius must reach ~0, and five
    times more PGD steps (half the step) must not raise accuracy."""
    e, eps = suite.eval, suite.train.eps
    flags = []
    huge = robust_accuracy(model, x, y, eps=HUGE_EPS, step_size=HUGE_EPS / 4, steps=10,
                           generator=_seeded(seed, x.device))
    if huge > HUGE_EPS_MAX_ACC:
        flags.append({"check": "huge_eps", "message": (
            f"PGD-10 at eps {HUGE_EPS} leaves {huge:.3f} accuracy "
            f"(expected <= {HUGE_EPS_MAX_ACC}): gradients may be masked")})
    few = pgd_correct.float().mean().item()
    many = robust_accuracy(model, x, y, eps=eps, step_size=e.pgd_step_ratio * eps / 2,
                           steps=e.pgd_steps * 5, generator=_seeded(seed + 2, x.device))
    if many > few + 0.02:
        flags.append({"check": "more_steps", "message": (
            f"PGD-{e.pgd_steps * 5} accuracy {many:.3f} is above PGD-{e.pgd_steps} "
            f"{few:.3f} on {len(y)} images: the attack does not converge")})
    return flags


def evaluate_run(run_dir: Path, suite: Suite, splits: Splits, device: torch.device | None = None,
                 progress: bool = True) -> dict:
    """Evaluate best and last checkpoints of a finished run and write `record.json`."""
    run_dir = Path(run_dir)
    device = device or pick_device()
    spec_path = run_dir / "spec.json"
    if not spec_path.exists():
        raise RecordError(f"{run_dir} is not a run folder (no spec.json); "
                          "train it first with `robench run`")
    import json

    spec = RunSpec.from_dict(json.loads(spec_path.read_text())["spec"])
    last = load_checkpoint(run_dir / "last.pt", map_location=device)
    if last["epoch"] < suite.train.epochs:
        raise RecordError(
            f"{run_dir} stopped after epoch {last['epoch']} of {suite.train.epochs}; "
            f"resume it with `robench run` before evaluating")
    trainer = Trainer(spec, suite, splits, run_dir, device=device, progress=False)
    trainer.check_suite_hash(last, "evaluate it with the suite file it was trained under, "
                                   "or delete the run folder and train it again")
    state = trainer.build()
    for defense in trainer.defenses:
        defense.setup(state)
    x = splits.test.x.to(device).float() / 255
    y = splits.test.y.to(device)
    metrics: dict = {}
    flags: list[dict] = []
    autoattack: dict = {}
    start = time.perf_counter()
    for tag in ("best", "last"):
        ckpt = last if tag == "last" else load_checkpoint(run_dir / "best.pt", device)
        trainer.model.load_state_dict(ckpt["model"])
        for defense, sd in zip(trainer.defenses, ckpt["defenses"], strict=True):
            defense.load_state_dict(sd)
        models = collect_eval_models(trainer.model, trainer.defenses, state)
        for name, module in models.items():
            label = f"[{tag} epoch {ckpt['epoch']}] {name}"
            m, f, aa = evaluate_model(module, x, y, suite,
                                      derive_seed(spec.seed, "eval") % (2**31), label, progress,
                                      num_classes=splits.info.num_classes)
            metrics.setdefault(name, {})[tag] = m
            flags += [{**flag, "model": name, "checkpoint": tag} for flag in f]
            autoattack[f"{name}.{tag}"] = aa
    eval_seconds = time.perf_counter() - start
    record = build_record(spec, suite, run_dir, metrics, flags, autoattack, last,
                          trainer, eval_seconds, device)
    write_json_atomic(run_dir / "record.json", record)
    return record


CURVE_KEYS = ("epoch", "train_robust", "val_robust", "train_clean", "val_clean", "train_loss",
              "lr")


def record_curves(history: list[dict]) -> dict[str, list]:
    """The record's per-epoch curves; `val_fgsm` joins them when the history has it."""
    keys = CURVE_KEYS + ((FGSM_KEY,) if any(FGSM_KEY in row for row in history) else ())
    return {k: [row.get(k) for row in history] for k in keys}


def build_record(spec: RunSpec, suite: Suite, run_dir: Path, metrics: dict, flags: list[dict],
                 autoattack: dict, last: dict, trainer: Trainer, eval_seconds: float,
                 device: torch.device) -> dict:
    history = read_history(run_dir / "history.jsonl")
    curves = record_curves(history)
    pretraining = [dict(e) for e in last.get("pretraining") or []]  # clean-model service
    aa_summary = {"version": suite.eval.autoattack}
    for key, info in autoattack.items():
        aa_summary[key] = {k: v for k, v in info.items() if k != "log"}
    return {
        "schema": 1,
        "run_id": spec.run_id,
        "row_name": spec.row_name,
        "spec": spec.to_dict(),
        "suite": {"name": suite.name, "hash": suite.protocol_hash,
                  "run_hash": suite.run_hash(spec.defense_names),
                  "overrides": suite.overrides_for(spec.defense_names),
                  "file_hash": suite.source_hash, "seeds": list(suite.seeds),
                  "description": suite.description,
                  "label_noise": suite.data.label_noise,
                  "injected_feature": suite.data.injected_feature},
        "metrics": metrics,
        "history": {"best_epoch": last["best"]["epoch"], "epochs": suite.train.epochs,
                    "best_val_robust": last["best"]["val_robust"], "curves": curves},
        "catastrophic_overfitting": catastrophic_overfitting_field(history),
        CO_RULE_KEY: CO_RULE_VERSION,
        "cost": {"train_seconds": float(last["seconds"]),
                 "seconds_per_epoch": [row["seconds"] for row in history],
                 "cpu_seconds_per_epoch": (
                     [row["cpu_seconds"] for row in history]
                     if history and all("cpu_seconds" in row for row in history) else None),
                 "curve_seconds": sum(row.get("curve_seconds", 0.0) for row in history),
                 "train_cpu_threads": sorted({row["cpu_threads"] for row in history
                                              if "cpu_threads" in row}),
                 "eval_seconds": eval_seconds,
                 "forward_passes": last["passes"]["forward"],
                 "backward_passes": last["passes"]["backward"],
                 "pretraining_seconds": sum(float(e["seconds"]) for e in pretraining),
                 "pretraining_forward_passes": sum(int(e["forward_passes"])
                                                   for e in pretraining),
                 "pretraining_backward_passes": sum(int(e["backward_passes"])
                                                    for e in pretraining)},
        "flags": flags,
        "extra_pretraining": pretraining,
        "cards": {d.name: d.card.to_dict() for d in trainer.defenses},
        "defense_params": {d.name: d.hparams for d in trainer.defenses},
        "autoattack": aa_summary,
        "autoattack_logs": {k: v.get("log", "") for k, v in autoattack.items()},
        "versions": software_versions(),
        "device": device_description(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
