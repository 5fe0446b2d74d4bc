"""`robench export RUN_DIR --robustbench OUT`: one evaluated run as a RobustBench-style model
entry (RobustBench, Croce et al., NeurIPS 2021 Datasets and Benchmarks: each model of its
leaderboard is a `model_info` JSON entry plus a checkpoint of a known architecture).

Reads the run's `record.json`, the suite it names (for eps and the architecture, checked
against the record's protocol hash) and one checkpoint (`weights_only=True`, its sha256
checked against the record). Never imports or runs defense code: the paper name, link and
extra data come from the defense cards stored in the record. Writes into the folder OUT:

  <name>.json               the entry: RobustBench's fields (link, name, authors,
                            additional_data, number_forward_passes, dataset, venue,
                            architecture, eps, clean_acc, reported, autoattack_acc, footnote,
                            unreliable) plus `threat_model` and a `robench` block with the
                            exact fractions and the evaluation protocol
  <name>.pt                 the trained model's plain state_dict (no optimizer, no defense
                            state, no extra models), loadable with `weights_only=True`
  <name>.architecture.json  what `bench.models.build_model` needs to rebuild it: model name
                            and kwargs, dataset name, classes, channels, image side and the
                            normalisation (mean and std, also in the state_dict as buffers)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from fractions import Fraction
from pathlib import Path

import torch

from bench.config import ConfigError, ModelConfig, Suite, load_suite
from bench.records import RecordError, read_record, write_json_atomic

CHECKPOINTS = ("last", "best")
THREAT_MODEL = "Linf"  # every ROBench attack is an L-infinity attack
# image side and channels of the built-in datasets (npz:<dir> datasets are read from the
# state_dict and the record instead, see `architecture`)
DATASET_SHAPES = {"cifar10": (32, 3), "cifar100": (32, 3), "svhn": (32, 3),
                  "fashion-mnist": (28, 1), "synthetic": (16, 1)}
ENTRY_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes",
                "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                "autoattack_acc", "footnote", "unreliable", "threat_model", "robench")


def eps_text(eps: float) -> str:
    """eps as RobustBench writes it: `8/255` when eps is k/255, else the decimal."""
    k = eps * 255
    if abs(k - round(k)) < 1e-9 and round(k) > 0:
        return f"{round(k)}/255"
    return repr(float(eps))


def eps_value(text: str) -> float:
    """The inverse of `eps_text`."""
    return float(Fraction(text)) if "/" in text else float(text)


def architecture_name(model: ModelConfig, kwargs: dict) -> str:
    """A human-readable name: PreActResNet-18, WideResNet-34-10, SmallCNN (...)."""
    if model.name == "preact_resnet18":
        return "PreActResNet-18" + ("" if kwargs.get("width") == 64 else
                                    f" (width {kwargs.get('width')})")
    if model.name == "wide_resnet":
        return f"WideResNet-{kwargs['depth']}-{kwargs['widen_factor']}"
    if model.name == "small_cnn":
        return "SmallCNN (" + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + ")"
    return model.name


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _suite_for(record: dict, suite: Suite | str | None, where: Path) -> Suite:
    if not isinstance(suite, Suite):
        suite = load_suite(suite or record["suite"]["name"])
    if suite.protocol_hash != record["suite"]["hash"]:
        raise ConfigError(
            f"{where}: the record was made under another version of suite "
            f"{record['suite']['name']!r} (protocol hash {record['suite']['hash'][:12]} vs "
            f"{suite.protocol_hash[:12]}); pass the suite file it ran under with --suite")
    return suite


def _load_state_dict(run_dir: Path, record: dict, tag: str) -> dict[str, torch.Tensor]:
    path = run_dir / f"{tag}.pt"
    if not path.exists():
        raise RecordError(f"{path} does not exist; the run folder is incomplete")
    data = path.read_bytes()
    want = record["checkpoints"][tag]["sha256"]
    if hashlib.sha256(data).hexdigest() != want:
        raise RecordError(f"{path} is not the checkpoint its record scored (sha256 differs); "
                          f"run `robench evaluate {run_dir}` again")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise RecordError(f"cannot load {path}: {exc}") from exc
    weights = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise RecordError(f"{path} holds no 'model' state_dict")
    return {k: v.detach().clone().contiguous() for k, v in weights.items()}


def architecture(suite: Suite, weights: dict[str, torch.Tensor]) -> dict:
    """The description `build_model` needs; mean and std are the ones the model was
    trained with (its `normalize` buffers)."""
    from bench.models import model_defaults

    mean = weights["normalize.mean"].flatten().tolist()
    std = weights["normalize.std"].flatten().tolist()
    dataset = suite.data.dataset
    size, channels = DATASET_SHAPES.get(dataset, (None, len(mean)))
    if size is None:
        raise ConfigError(f"dataset {dataset!r}: the export knows the image side of "
                          f"{sorted(DATASET_SHAPES)} only")
    from bench.data import _NUM_CLASSES

    classes = _NUM_CLASSES.get(dataset)
    if classes is None:
        raise ConfigError(f"dataset {dataset!r}: the export knows the classes of "
                          f"{sorted(_NUM_CLASSES)} only")
    return {"builder": "bench.models.build_model",
            "model": {"name": suite.model.name,
                      "kwargs": {**model_defaults(suite.model.name), **suite.model.kwargs}},
            "dataset": {"name": dataset, "num_classes": classes, "channels": channels,
                        "size": size, "mean": mean, "std": std},
            "input": "float NCHW images in [0, 1]; the model normalises them itself "
                     "(buffers normalize.mean and normalize.std)"}


def build_from_description(description: dict) -> torch.nn.Module:
    """A fresh model of the described architecture (random weights)."""
    from bench.data import DatasetInfo
    from bench.models import build_model

    d, m = description["dataset"], description["model"]
    info = DatasetInfo(d["name"], d["num_classes"], d["channels"], d["size"],
                       tuple(d["mean"]), tuple(d["std"]))
    return build_model(ModelConfig(m["name"], dict(m["kwargs"])), info)


def _cards(record: dict) -> list[dict]:
    names = [d["name"] for d in record["spec"]["defenses"]]
    return [record["cards"].get(n) or {"name": n} for n in names]


def reported(record: dict, tag: str) -> str:
    """The published AutoAttack accuracy (percent) of a card entry that matches this run:
    same suite, base method, defenses, parameters and compared checkpoint; else ''."""
    from leaderboard.reproduction import compared_checkpoint, params_match

    spec = record["spec"]
    names = [d["name"] for d in spec["defenses"]]
    for card in _cards(record):
        for entry in card.get("published") or ():
            if (entry.get("metric") == "autoattack"
                    and entry.get("suite") == record["suite"]["name"]
                    and entry.get("method") == spec["method"]
                    and list(entry.get("defenses") or ()) == names
                    and params_match(record, entry.get("params") or {})
                    and compared_checkpoint(entry) == tag):
                return f"{float(entry['value']):.2f}"
    return ""


def paper_parts(card: dict) -> tuple[str, str]:
    """(authors, title) of a card's `paper`, written "Authors. Title" on every card."""
    paper = card.get("paper") or card.get("name", "")
    authors, dot, title = paper.partition(". ")
    return (authors, title) if dot else ("", paper)


def entry_name(record: dict, tag: str) -> str:
    """File-name-safe: ROBench_<suite>_<row>_seed<seed>_<checkpoint>."""
    suite, row, seed = record["suite"]["name"], record["row_name"], record["spec"]["seed"]
    raw = f"ROBench_{suite}_{row}_seed{seed}_{tag}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def build_entry(record: dict, suite: Suite, tag: str, description: dict, name: str) -> dict:
    m = record["metrics"]["model"][tag]
    spec, ev = record["spec"], record["evaluation"]
    cards = _cards(record)
    extra = [c.get("extra_data", "none") for c in cards if c.get("extra_data", "none") != "none"]
    aa = ev["autoattack"]
    flags = [f for f in record["flags"] if f["model"] == "model" and f["checkpoint"] == tag
             and f["level"] != "note"]
    method = spec["method"]
    title = " + ".join([method.upper(), *(c.get("name", "?") for c in cards)])
    papers = [paper_parts(c) for c in cards]
    subset = "" if m["autoattack"] is None else f" on the first {m['n_autoattack']}"
    footnote = (f"ROBench suite {suite.name} (protocol {record['suite']['hash'][:12]}), seed "
                f"{spec['seed']}, {tag} checkpoint (epoch {m['epoch']}); clean accuracy on "
                f"{m['n']} test images, {aa.get('label') or 'no AutoAttack'}{subset}.")
    if extra:
        footnote += " Extra data: " + "; ".join(extra) + "."
    return {
        "link": " ".join(c.get("link", "") for c in cards if c.get("link")),
        "name": "; ".join(p[1] for p in papers) if cards else f"{title} baseline (ROBench)",
        "authors": "; ".join(p[0] for p in papers if p[0]),
        "additional_data": bool(extra),
        "number_forward_passes": 1,
        "dataset": suite.data.dataset,
        "venue": "; ".join(c.get("venue", "") for c in cards if c.get("venue")),
        "architecture": architecture_name(suite.model, description["model"]["kwargs"]),
        "eps": eps_text(suite.train.eps),
        "clean_acc": _percent(m["clean"]),
        "reported": reported(record, tag),
        "autoattack_acc": _percent(m["autoattack"]),
        "footnote": footnote,
        "unreliable": any(f["level"] == "masking" for f in flags),
        "threat_model": THREAT_MODEL,
        "robench": {
            "evaluated_by": "ROBench", "row": record["row_name"], "defenses": title,
            "run_id": record["run_id"], "suite": suite.name,
            "protocol_hash": record["suite"]["hash"], "seed": spec["seed"],
            "checkpoint": tag, "epoch": m["epoch"],
            "checkpoint_sha256": record["checkpoints"][tag]["sha256"],
            "eps": suite.train.eps, "clean": m["clean"], "n_clean": m["n"],
            "autoattack": m["autoattack"], "n_autoattack": m["n_autoattack"],
            "autoattack_version": aa.get("version"), "autoattack_label": aa.get("label"),
            "autoattack_images": f"the first {m['n_autoattack']} of the {m['n']} test "
                                 "images the suite evaluates" if m["autoattack"] is not None
                                 else None,
            "pgd20": m["pgd20"], "cw20": m["cw20"], "worst_case": m["worst_case"],
            "flags": [f"{f['check']} ({f['level']})" for f in flags],
            "precision": ev.get("precision"),
            "robench_version": (record.get("provenance") or {}).get("robench_version"),
            "git_commit": (record.get("provenance") or {}).get("git_commit"),
            "state_dict": f"{name}.pt", "architecture_file": f"{name}.architecture.json",
        },
    }


def export_robustbench(run_dir: Path, out: Path, checkpoint: str = "last",
                       suite: Suite | str | None = None) -> list[Path]:
    """Write the entry, the state_dict and the architecture description into `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--robustbench {out}: a file is there; give a folder to write into")
    path = run_dir / "record.json"
    if not path.is_file():
        raise RecordError(f"{run_dir} is not an evaluated run folder (no record.json); train "
                          "and evaluate it with `robench run` first")
    record = read_record(path)
    suite = _suite_for(record, suite, path)
    weights = _load_state_dict(run_dir, record, checkpoint)
    description = architecture(suite, weights)
    model = build_from_description(description)
    try:  # the description must rebuild exactly these weights
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise RecordError(f"{run_dir / (checkpoint + '.pt')}: its weights do not fit "
                          f"{suite.model.name}: {str(exc).splitlines()[0]}") from exc
    name = entry_name(record, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    pt = out / f"{name}.pt"
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    pt.write_bytes(buffer.getvalue())
    description = {**description, "state_dict": pt.name,
                   "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    arch = out / f"{name}.architecture.json"
    write_json_atomic(arch, description)
    entry_path = out / f"{name}.json"
    write_json_atomic(entry_path, build_entry(record, suite, checkpoint, description, name))
    return [entry_path, pt, arch]


def summary_line(paths: list[Path]) -> str:
    entry = json.loads(paths[0].read_text())
    return (f"{entry['robench']['row']} ({entry['robench']['checkpoint']} checkpoint): clean "
            f"{entry['clean_acc']}%, AutoAttack {entry['autoattack_acc'] or 'n/a'}%, eps "
            f"{entry['eps']} ({entry['threat_model']})")
