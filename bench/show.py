"""`robench show RUN_DIR`: one run at a glance, its curves as a PNG and a text summary.

Robust overfitting (Rice et al., 2020) shows in a run's curves: validation robust accuracy
peaks, then falls while training robust accuracy keeps rising. This view draws those curves
(train vs validation robust and clean accuracy per epoch, from `history.jsonl`, the best
epoch marked) and prints what the record says: the run, the test metrics of the best and the
last checkpoint and their gap, the best epoch, the flags with their level, the costs, and the
extra models (sub-rows) a defense keeps.

It reads only the run folder's files (`spec.json`, `history.jsonl`, `record.json`): no
torch, no defense code. A run that is still training or not yet evaluated (no record) shows
its curves so far and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import ConfigError, load_suite, row_name
from leaderboard.schema import SchemaError, validate_record

TRAINED = "model"
PNG_NAME = "curves.png"
DASH = "–"
# (record key, column title); AutoAttack's title is the record's label of what ran
COLUMNS = (("clean", "clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack"),
           ("worst_case", "worst case"))
GAP_KEYS = ("pgd20", "autoattack", "worst_case")  # as the leaderboard: best - last
# what each flag level does on the leaderboard (its legend, in one line)
LEVEL_TEXT = {
    "masking": "the gradients may be masked, so robust accuracy may be inflated: row not "
               "ranked (⚑)",
    "integrity": "what training recorded does not match the checkpoint: row not ranked (⚑)",
    "health": "the model did not learn, or PGD-20 overstates robustness: marked (†), "
              "still ranked",
    "note": "shown only, changes nothing",
}
CURVES = (("train_robust", "train robust", "--"), ("val_robust", "validation robust", "-"),
          ("train_clean", "train clean", "--"), ("val_clean", "validation clean", "-"))


@dataclass
class RunView:
    """What a run folder holds: its spec, its per-epoch history and its record (if any)."""

    run_dir: Path
    spec: dict = field(default_factory=dict)
    run_hash: str = ""
    history: list[dict] = field(default_factory=list)
    record: dict | None = None

    @property
    def evaluated(self) -> bool:
        return self.record is not None

    @property
    def name(self) -> str:
        if self.record:
            return str(self.record["row_name"])
        names = [str(d.get("name")) for d in self.spec.get("defenses") or []]
        return row_name(str(self.spec.get("method", "?")), names)

    @property
    def best_epoch(self) -> int | None:
        """The record's best epoch; before evaluation, the first epoch with the highest
        validation robust accuracy so far (the engine's rule for best.pt)."""
        if self.record:
            return int(self.record["history"]["best_epoch"])
        best, top = None, -math.inf
        for row in self.history:
            value = _number(row.get("val_robust"))
            if value is not None and value > top:
                best, top = int(row["epoch"]), value
        return best

    def curves(self) -> dict[str, list]:
        """Per-epoch curves: from `history.jsonl`, else from the record's copy."""
        if self.history:
            keys = {k for row in self.history for k in row}
            return {k: [row.get(k) for row in self.history] for k in keys}
        return dict((self.record or {}).get("history", {}).get("curves") or {})


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def load_run(run_dir: str | Path) -> RunView:
    """Read a run folder; ConfigError (one line) when it is missing or unusable."""
    folder = Path(run_dir)
    hint = ("expected a run folder results/<suite>/<run-id>/ holding spec.json, history.jsonl "
            "and, once evaluated, record.json")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; {hint}")
    view = RunView(folder)
    try:
        if (folder / "spec.json").exists():
            spec_file = json.loads((folder / "spec.json").read_text())
            view.spec, view.run_hash = spec_file["spec"], str(spec_file.get("suite_hash", ""))
        if (folder / "history.jsonl").exists():
            view.history = [json.loads(line) for line in
                            (folder / "history.jsonl").read_text().splitlines() if line.strip()]
        if (folder / "record.json").exists():
            record = json.loads((folder / "record.json").read_text())
            validate_record(record)
            view.record, view.spec = record, record["spec"]
            view.run_hash = record["suite"]["run_hash"]
    except SchemaError as exc:
        raise ConfigError(f"{folder / 'record.json'} breaks the record schema "
                          f"({exc}); run `robench evaluate {folder}` again") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the run folder {folder} "
                          f"({type(exc).__name__}: {exc})") from exc
    if not view.spec and not view.history:
        raise ConfigError(f"{folder} holds no spec.json, history.jsonl or "
                          f"record.json; {hint}")
    return view


def _pct(value: Any) -> str:
    number = _number(value)
    return DASH if number is None else f"{100 * number:.2f}"


def _metric_lines(label: str, per_ckpt: dict, aa_title: str) -> list[str]:
    """A small table: best, last and gap, one column per metric (in %)."""
    titles = [aa_title if key == "autoattack" else title for key, title in COLUMNS]
    widths = [max(12, len(t) + 2) for t in titles]
    rows = [(label, titles)]
    for ckpt in ("best", "last"):
        m = per_ckpt[ckpt]
        rows.append((f"{ckpt} (epoch {m.get('epoch')})", [_pct(m.get(k)) for k, _ in COLUMNS]))
    gaps = []
    for key, _ in COLUMNS:
        best, last = _number(per_ckpt["best"].get(key)), _number(per_ckpt["last"].get(key))
        ok = key in GAP_KEYS and best is not None and last is not None
        gaps.append(_pct(best - last) if ok else DASH)
    rows.append(("gap (best - last)", gaps))
    return [f"  {head:<22}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))
            for head, cells in rows]


def _cost_line(record: dict) -> str:
    cost = record["cost"]
    epochs = len(cost.get("seconds_per_epoch") or []) or record["history"]["epochs"]
    train = float(cost["train_seconds"])
    text = (f"Cost: training {train:.1f} s ({train / epochs:.2f} s/epoch over {epochs} "
            f"epochs), {cost['forward_passes']} forward + {cost['backward_passes']} backward "
            f"passes, evaluation {float(cost['eval_seconds']):.1f} s")
    extras = [e for e in record.get("extra_pretraining") or [] if isinstance(e, dict)]
    seconds = _number(cost.get("pretraining_seconds")) or 0.0
    if extras or seconds > 0:
        what = ", ".join(str(e.get("what", "?")) for e in extras) or "unnamed"
        passes = sum(int(cost.get(f"pretraining_{d}_passes") or 0)
                     for d in ("forward", "backward"))
        text += f"; extra pretraining: {what}, {seconds:.1f} s, {passes} passes"
    else:
        text += "; extra pretraining: none"
    return text


def summary(view: RunView, png: Path | None = None) -> str:
    """The text the terminal shows."""
    spec = view.spec
    rec = view.record
    suite_name = str(spec.get("suite", "?"))
    if rec:
        protocol = str(rec["suite"]["hash"])[:12]
    else:
        try:
            protocol = load_suite(suite_name).protocol_hash[:12] + " (installed suite file)"
        except (ConfigError, OSError, ValueError):
            protocol = "unknown"
    lines = [f"Run {view.name} · suite {suite_name} · seed {spec.get('seed', '?')} · "
             f"protocol {protocol} · run hash {view.run_hash[:12] or '?'} · {view.run_dir}"]
    best = view.best_epoch
    if rec is None:
        total = _planned_epochs(suite_name)
        done = len(view.history)
        lines.append(f"Not evaluated yet (no record.json): {done}"
                     f"{'' if total is None else f' of {total}'} epochs trained; "
                     "`robench run` evaluates it once training ends (run the same command again to "
                     "resume an interrupted run).")
        if best is not None:
            row = next(r for r in view.history if r.get("epoch") == best)
            lines.append(f"Best epoch so far: {best} (validation robust "
                         f"{_pct(row.get('val_robust'))}%); latest epoch {done}: validation "
                         f"robust {_pct(view.history[-1].get('val_robust'))}%, train robust "
                         f"{_pct(view.history[-1].get('train_robust'))}%")
    else:
        aa = rec["evaluation"]["autoattack"]
        aa_title = aa.get("label") or "AutoAttack"
        lines.append(f"Best epoch: {best} of {rec['history']['epochs']} (highest validation "
                     "PGD robust accuracy; test metrics below in %)")
        lines += _metric_lines("trained model", rec["metrics"][TRAINED], aa_title)
        for model in sorted(m for m in rec["metrics"] if m != TRAINED):
            lines += _metric_lines(f"↳ [{model}]", rec["metrics"][model], aa_title)
        co = rec.get("catastrophic_overfitting")
        if isinstance(co, dict):
            lines.append(f"Catastrophic overfitting at epoch {co.get('epoch')}")
        lines += _flag_lines(rec["flags"])
        lines.append(_cost_line(rec))
    if png is not None:
        lines.append(f"Curves: {png}")
    return "\n".join(lines)


def _flag_lines(flags: list[dict]) -> list[str]:
    if not flags:
        return ["Flags: none"]
    lines = ["Flags:"]
    for f in flags:
        lines.append(f"  [{f['level']}] {f['check']} ({f['model']}, {f['checkpoint']}): "
                     f"{' '.join(str(f['message']).split())}")
    for level in sorted({f["level"] for f in flags}, key=list(LEVEL_TEXT).index):
        lines.append(f"  {level}: {LEVEL_TEXT[level]}")
    return lines


def _planned_epochs(suite_name: str) -> int | None:
    try:
        return int(load_suite(suite_name).train.epochs)
    except (ConfigError, OSError, ValueError, AttributeError):
        return None


def draw_curves(view: RunView, path: Path):
    """Write the curves PNG to `path`; return the matplotlib Figure (the caller closes it).
    Robust and clean accuracy in %, train dashed, validation solid, the best epoch marked by
    a vertical line and a star on the validation robust curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = view.curves()
    epochs = curves.get("epoch") or []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"robust": "tab:red", "clean": "tab:blue"}
    for key, label, style in CURVES:
        points = [(e, 100 * v) for e, v in zip(epochs, curves.get(key) or [])
                  if _number(v) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, linestyle=style, marker="." if len(xs) <= 40 else "", label=label,
                    color=colors[key.split("_")[1]])
    fgsm = [(e, 100 * v) for e, v in zip(epochs, curves.get("val_fgsm") or [])
            if _number(v) is not None]
    if fgsm:
        xs, ys = zip(*fgsm)
        ax.plot(xs, ys, linestyle=":", color="tab:orange", label="validation FGSM")
    best = view.best_epoch
    val = dict(zip(epochs, curves.get("val_robust") or []))
    if best is not None:
        ax.axvline(best, color="gray", linewidth=0.8)
        if _number(val.get(best)) is not None:
            ax.plot([best], [100 * val[best]], marker="*", markersize=14, color="black",
                    linestyle="none", label=f"best epoch {best}")
    state = "" if view.evaluated else " (not evaluated yet)"
    ax.set(xlabel="epoch", ylabel="accuracy (%)",
           title=f"{view.name}, {view.spec.get('suite', '?')}, seed "
                 f"{view.spec.get('seed', '?')}{state}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def show(run_dir: str | Path, out: str | Path | None = None, plot: bool = True) -> str:
    """Write the curves PNG (RUN_DIR/curves.png, or `out`: a .png file, or a folder that
    gets curves_<run-id>.png) and return the text summary."""
    view = load_run(run_dir)
    png = None
    if plot and (view.history or view.curves().get("epoch")):
        png = Path(out) if out else view.run_dir / PNG_NAME
        if png.suffix.lower() != ".png":  # a folder: one file per run
            png = png / f"curves_{view.run_dir.resolve().name}.png"
        import matplotlib.pyplot as plt

        plt.close(draw_curves(view, png))
    return summary(view, png)
