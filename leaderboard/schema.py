"""The `record.json` schema (version 2) and its validator, plus the per-image bit strings.

Plain Python on purpose (no torch, numpy or pandas): the engine validates every record
before writing it, `robench verify` and the leaderboard validate every record they read.
A record that fails is never averaged into a table.

Per-image results are stored as bit strings: `pack_bits([True, False, ...])` gives hex
text (8 images per byte, first image in the highest bit); `unpack_bits(text, n)` inverts
it. The validator recomputes every stored fraction from its bits, so a record whose
numbers disagree with its own per-image results is refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

SCHEMA = 2
METRICS = ("clean", "pgd20", "cw20", "autoattack", "worst_case")
CHECKPOINTS = ("best", "last")
FLAG_LEVELS = ("masking", "integrity", "health", "note")
AUTOATTACK_VERSIONS = ("standard", "apgd", "reduced", "none")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# metric -> the per-image attacks whose AND gives it, and on how many images
PER_IMAGE_OF = {"clean": ("clean",), "pgd20": ("pgd20",), "cw20": ("cw20",),
                "autoattack": ("autoattack",)}


class SchemaError(ValueError):
    """A record does not follow the schema; the message names the field."""


def pack_bits(flags: list[bool]) -> str:
    """Hex text of a list of booleans (8 per byte, first in the highest bit)."""
    out = bytearray((len(flags) + 7) // 8)
    for i, bit in enumerate(flags):
        if bit:
            out[i // 8] |= 0x80 >> (i % 8)
    return out.hex()


def unpack_bits(text: str, n: int) -> list[bool]:
    """The first `n` booleans of `pack_bits` text; SchemaError when it is not that."""
    try:
        data = bytes.fromhex(text)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"not a hex bit string: {str(text)[:20]!r}") from exc
    if len(data) != (n + 7) // 8:
        raise SchemaError(f"bit string holds {len(data) * 8} bits, expected {n}")
    return [bool(data[i // 8] & (0x80 >> (i % 8))) for i in range(n)]


def decode_per_image(m: dict, bits: dict, where: str) -> dict[str, list[bool]]:
    """A checkpoint's per-image results by attack: clean, PGD-20 and CW-20 on all `n` test
    images, the other attacks on the first `n_worst_case` (the attack subset)."""
    decoded: dict[str, list[bool]] = {}
    for attack, text in bits.items():
        length = m["n"] if attack in ("clean", "pgd20", "cw20") else m["n_worst_case"]
        try:
            decoded[attack] = unpack_bits(text, length)
        except SchemaError as exc:
            raise SchemaError(f"{where}[{attack!r}]: {exc}") from exc
    return decoded


def _fraction(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0.0 <= value <= 1.0)


def _count(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _need(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise SchemaError(f"{where}: {problem}")


def _check_metrics(model: str, ckpt: str, m: Any, bits: Any) -> None:
    where = f"metrics[{model!r}][{ckpt!r}]"
    _need(isinstance(m, dict), where, "not an object")
    _need(_count(m.get("n")), f"{where}.n", f"must be an integer > 0, got {m.get('n')!r}")
    for key in ("clean", "pgd20", "cw20", "worst_case"):
        _need(_fraction(m.get(key)), f"{where}.{key}",
              f"must be a fraction in [0, 1], got {m.get(key)!r}")
    _need(_count(m.get("n_worst_case")), f"{where}.n_worst_case", "must be an integer > 0")
    _need(m["n_worst_case"] <= m["n"], f"{where}.n_worst_case", "exceeds n")
    for key in ("autoattack", "square_only"):
        _need(m.get(key) is None or _fraction(m.get(key)), f"{where}.{key}",
              f"must be a fraction in [0, 1] or null, got {m.get(key)!r}")
    if m.get("autoattack") is not None:
        _need(_count(m.get("n_autoattack")) and m["n_autoattack"] <= m["n"],
              f"{where}.n_autoattack", "must be an integer in [1, n] when AutoAttack ran")
    _need(_count(m.get("epoch")), f"{where}.epoch", "must be an integer >= 1")
    _need(m["pgd20"] <= m["clean"] and m["cw20"] <= m["clean"], where,
          "an attack cannot raise accuracy above clean accuracy")
    _need(isinstance(bits, dict), f"per_image[{model!r}][{ckpt!r}]", "missing")
    n_sub = m["n_worst_case"]
    decoded = decode_per_image(m, bits, f"per_image[{model!r}][{ckpt!r}]")
    clean = decoded.get("clean")
    if clean is not None:
        for attack, flags in decoded.items():
            _need(not any(f and not c for f, c in zip(flags, clean)),
                  f"per_image[{model!r}][{ckpt!r}][{attack!r}]",
                  "an image counted robust must also be classified correctly without attack "
                  "(a record evaluated before ROBench counted it so: run `robench evaluate` "
                  "on its run folder again)")
    for metric, attacks in PER_IMAGE_OF.items():
        if m.get(metric) is None:
            continue
        _need(all(a in decoded for a in attacks), f"per_image[{model!r}][{ckpt!r}]",
              f"no per-image result for {metric}")
        flags = decoded[attacks[0]]
        _need(abs(sum(flags) / len(flags) - m[metric]) < 1e-9, f"{where}.{metric}",
              f"{m[metric]} disagrees with its per-image results ({sum(flags)}/{len(flags)})")
    worst = [all(decoded[a][i] for a in decoded) for i in range(n_sub)]
    _need(abs(sum(worst) / n_sub - m["worst_case"]) < 1e-9, f"{where}.worst_case",
          f"{m['worst_case']} disagrees with the per-image results ({sum(worst)}/{n_sub})")


def validate_record(rec: Any) -> None:
    """Raise SchemaError naming the first field that makes `rec` unusable."""
    try:
        _validate(rec)
    except SchemaError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        raise SchemaError(f"record: malformed ({type(exc).__name__}: {exc})") from exc


def _validate(rec: Any) -> None:
    _need(isinstance(rec, dict), "record", f"expected a JSON object, got {type(rec).__name__}")
    _need(rec.get("schema") == SCHEMA, "schema",
          f"{rec.get('schema')!r} is not {SCHEMA}: a record made by an older ROBench, whose "
          "checkpoints lack what the evaluator now reads; delete its run folder and run it "
          "again")
    for key, kind in (("run_id", str), ("row_name", str), ("spec", dict), ("suite", dict),
                      ("metrics", dict), ("per_image", dict), ("models", dict),
                      ("history", dict), ("cost", dict), ("flags", list),
                      ("checkpoints", dict), ("evaluation", dict), ("provenance", dict),
                      ("defense_params", dict), ("cards", dict), ("extra_pretraining", list)):
        _need(isinstance(rec.get(key), kind), key, f"missing or not a {kind.__name__}")
    spec, suite = rec["spec"], rec["suite"]
    _need(isinstance(spec.get("method"), str), "spec.method", "missing")
    _need(_count(spec.get("seed"), 0), "spec.seed", "must be an integer >= 0")
    defenses = spec.get("defenses")
    _need(isinstance(defenses, list) and all(
        isinstance(d, dict) and isinstance(d.get("name"), str)
        and isinstance(d.get("params", {}), dict) for d in defenses),
        "spec.defenses", "not a list of {name, params} objects")
    _need(len(rec["defense_params"]) == len(defenses), "defense_params",
          "must hold the effective parameters of each defense of the spec")
    for key in ("name", "hash", "run_hash"):
        _need(isinstance(suite.get(key), str) and suite[key], f"suite.{key}", "missing")
    _need(isinstance(suite.get("seeds"), list) and all(_count(s, 0) for s in suite["seeds"]),
          "suite.seeds", "not a list of integers")
    metrics, models = rec["metrics"], rec["models"]
    _need("model" in metrics, "metrics", "has no entry for the trained model 'model'")
    _need(set(models) == set(metrics), "models", "must list exactly the models in metrics")
    for name, info in models.items():
        ranked = isinstance(info, dict) and info.get("ranked") is (name == "model")
        _need(ranked, f"models[{name!r}]", "only the trained model 'model' is ranked")
    for model, per_ckpt in metrics.items():
        _need(isinstance(per_ckpt, dict), f"metrics[{model!r}]", "not an object")
        for ckpt in CHECKPOINTS:
            bits = (rec["per_image"].get(model) or {}).get(ckpt)
            _check_metrics(model, ckpt, per_ckpt.get(ckpt), bits)
    for ckpt in CHECKPOINTS:
        info = rec["checkpoints"].get(ckpt)
        _need(isinstance(info, dict) and isinstance(info.get("sha256"), str)
              and bool(SHA256.match(info["sha256"])), f"checkpoints.{ckpt}.sha256",
              "must be 64 lowercase hex digits")
        _need(_count(info.get("epoch")), f"checkpoints.{ckpt}.epoch", "must be an integer >= 1")
        _need(metrics["model"][ckpt]["epoch"] == info["epoch"], f"checkpoints.{ckpt}.epoch",
              "differs from the epoch of its metrics")
    hist = rec["history"]
    _need(_count(hist.get("epochs")), "history.epochs", "must be an integer > 0")
    _need(_count(hist.get("best_epoch")) and hist["best_epoch"] <= hist["epochs"],
          "history.best_epoch", "must be an integer in [1, epochs]")
    _need(isinstance(hist.get("curves", {}), dict), "history.curves", "not an object")
    aa = rec["evaluation"].get("autoattack")
    _need(isinstance(aa, dict) and aa.get("version") in AUTOATTACK_VERSIONS,
          "evaluation.autoattack.version", f"must be one of {AUTOATTACK_VERSIONS}")
    for i, f in enumerate(rec["flags"]):
        _need(isinstance(f, dict) and isinstance(f.get("check"), str)
              and f.get("level") in FLAG_LEVELS and isinstance(f.get("message"), str)
              and f.get("model") in metrics and f.get("checkpoint") in CHECKPOINTS,
              f"flags[{i}]", f"needs check, level in {FLAG_LEVELS}, message, a model of "
              "metrics and a checkpoint")
    cost = rec["cost"]
    for key in ("forward_passes", "backward_passes"):
        _need(_count(cost.get(key), 0), f"cost.{key}", "must be an integer >= 0")
    for key in ("train_seconds", "eval_seconds"):
        value = cost.get(key)
        _need(isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and value >= 0, f"cost.{key}", "must be a number >= 0")
    co = rec.get("catastrophic_overfitting")
    _need(co is None or (isinstance(co, dict) and _count(co.get("epoch"))),
          "catastrophic_overfitting", "neither null nor an object with an integer 'epoch'")
