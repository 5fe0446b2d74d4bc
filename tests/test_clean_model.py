"""The clean-model service (bench/clean_model.py and the engine's `clean_model`
capability): trained once per (suite, architecture, seed, recipe), cached atomically in
the results folder, reused across runs and never retrained on resume; the record and the
leaderboard declare it as extra pretraining and count its cost."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import with_train
from invariants import assert_same_state, model_state, train

import bench.clean_model as service
from bench.config import ConfigError, DefenseSpec, RunSpec, parse_suite
from bench.engine import Trainer
from bench.records import RecordError, load_checkpoint, read_history
from bench.runner import run_one
from defenses.base import Defense, DefenseCard
from leaderboard.compile import compile_tables, load_records

CPU = torch.device("cpu")


class WarmProbe(Defense):
    """Asks for the clean model and starts from it (as CURE does); records what it got."""

    name = "warm_probe"
    card = DefenseCard(name="WarmProbe", paper="test")
    capabilities = ("clean_model",)
    params = {"tag": 0}

    def __init__(self, tag: int = 0) -> None:
        super().__init__(tag=tag)
        self.seen: list[torch.nn.Module | None] = []  # not a submodule: not checkpointed

    @property
    def received(self) -> torch.nn.Module | None:
        (model,) = self.seen
        return model

    def setup(self, state) -> None:
        self.seen.append(state.clean_model)
        if state.clean_model is not None:
            state.model.load_state_dict(state.clean_model.state_dict())


@pytest.fixture
def registered(monkeypatch):
    import defenses.base as base

    monkeypatch.setitem(base._REGISTRY, "warm_probe", WarmProbe)
    return DefenseSpec("warm_probe")


def count_trainings(monkeypatch) -> list:
    calls: list = []
    original = Trainer._train_clean_model

    def counted(self, folder, suite):
        calls.append(folder)
        return original(self, folder, suite)
    monkeypatch.setattr(Trainer, "_train_clean_model", counted)
    return calls


def warm_run(run_dir, suite, splits, cache, seed=0, stop=None, tag=0, progress=False):
    probe = WarmProbe(tag)
    trainer = Trainer(RunSpec(suite.name, "at", (), seed), suite, splits, run_dir, device=CPU,
                      progress=progress, clean_models_dir=cache)
    original = trainer.build

    def build():
        state = original()
        trainer.defenses = [probe]
        probe.bind_random_stream(seed, CPU)
        trainer._bind_defenses()
        return state
    trainer.build = build  # type: ignore[method-assign]
    trainer.train(stop_after_epochs=stop)
    return trainer, probe


def test_trained_once_cached_and_reused(tmp_path, smoke_suite, smoke_splits, monkeypatch):
    calls = count_trainings(monkeypatch)
    cache = tmp_path / "cache"
    first, probe = warm_run(tmp_path / "a", smoke_suite, smoke_splits, cache)
    assert len(calls) == 1
    (entry,) = cache.iterdir()
    assert entry == service.cache_dir(cache, smoke_suite, 0, "fp32")
    assert {p.name for p in entry.iterdir()} == {"train", "model.pt", "clean_model.json"}
    assert {p.name for p in (entry / "train").iterdir()} == {"spec.json", "history.jsonl"}
    assert len(read_history(entry / "train" / "history.jsonl")) == smoke_suite.train.epochs
    saved = load_checkpoint(entry / "model.pt")
    # the defense got a frozen, eval-mode copy of exactly the cached weights
    clean = probe.received
    assert clean is not None and not clean.training
    assert not any(p.requires_grad for p in clean.parameters())
    assert_same_state(saved["model"], clean.state_dict())
    # a standard run of the clean budget, trained apart, gives the same weights
    plain = train(tmp_path / "std", smoke_suite, smoke_splits, method="standard")
    assert_same_state(model_state(plain.run_dir), saved["model"])
    info = load_checkpoint(tmp_path / "a" / "last.pt")["pretraining"]
    assert info[0]["reused"] is False and info[0]["for"] == ["warm_probe"]

    stamp = (entry / "model.pt").stat().st_mtime_ns
    second, probe2 = warm_run(tmp_path / "b", smoke_suite, smoke_splits, cache, tag=1)
    assert len(calls) == 1  # not trained again
    assert (entry / "model.pt").stat().st_mtime_ns == stamp
    assert_same_state(probe2.received.state_dict(), saved["model"])
    again = load_checkpoint(tmp_path / "b" / "last.pt")["pretraining"][0]
    assert again["reused"] is True and again["seconds"] == info[0]["seconds"]
    # training it or finding it cached makes no difference to the run
    assert_same_state(model_state(tmp_path / "a"), model_state(tmp_path / "b"))


def test_cache_entries_are_keyed_by_suite_architecture_seed_and_recipe(smoke_suite, tmp_path):
    def key(suite=smoke_suite, seed=0, precision="fp32"):
        return service.cache_dir(tmp_path, suite, seed, precision).name

    base = key()
    assert base.startswith("small_cnn-seed0-") and key() == base
    assert key(seed=1).startswith("small_cnn-seed1-")
    other_model = replace(smoke_suite, model=replace(smoke_suite.model,
                                                     kwargs={"width": 16, "fc": 32}))
    longer = replace(smoke_suite, clean_model=replace(smoke_suite.clean_model, epochs=5))
    changed = [key(seed=1), key(suite=with_train(smoke_suite, lr=0.01)),
               key(suite=replace(smoke_suite, name="other")), key(suite=other_model),
               key(suite=longer), key(precision="bfloat16")]
    assert len({base, *changed}) == 1 + len(changed)
    # the suite's own epochs by default; an explicit 0 means the same
    assert smoke_suite.clean_model_epochs == smoke_suite.train.epochs == 2
    assert longer.clean_model_epochs == 5
    assert service.clean_suite(longer).train.epochs == 5


def test_the_clean_model_has_its_own_epoch_budget(tmp_path, smoke_suite, smoke_splits):
    suite = replace(smoke_suite, clean_model=replace(smoke_suite.clean_model, epochs=1))
    warm_run(tmp_path / "a", suite, smoke_splits, tmp_path / "cache")
    entry = service.cache_dir(tmp_path / "cache", suite, 0, "fp32")
    assert len(read_history(entry / "train" / "history.jsonl")) == 1
    info = json.loads((entry / "clean_model.json").read_text())
    assert info["epochs"] == 1 and info["recipe"]["epochs"] == 1
    assert len(read_history(tmp_path / "a" / "history.jsonl")) == 2  # the run keeps its own


def test_seeds_get_their_own_clean_models(tmp_path, smoke_suite, smoke_splits, monkeypatch):
    calls = count_trainings(monkeypatch)
    cache = tmp_path / "cache"
    warm_run(tmp_path / "s0", smoke_suite, smoke_splits, cache, seed=0)
    warm_run(tmp_path / "s1", smoke_suite, smoke_splits, cache, seed=1)
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2


def test_half_written_cache_is_never_used(tmp_path, smoke_suite, smoke_splits, monkeypatch):
    from bench import records

    def crash(payload, path):  # dies halfway through writing model.pt
        def write(handle):
            handle.write(b"partial")
            raise OSError("disk full")
        records._atomic_write(path, write)
    monkeypatch.setattr(service, "atomic_torch_save", crash)
    with pytest.raises(OSError, match="disk full"):
        warm_run(tmp_path / "a", smoke_suite, smoke_splits, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    assert not (entry / "model.pt").exists()
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    calls = count_trainings(monkeypatch)
    warm_run(tmp_path / "b", smoke_suite, smoke_splits, tmp_path / "cache")
    assert len(calls) == 1 and (entry / "model.pt").exists()
    # a corrupt model.pt is a clear error, not a silent retrain or a crash
    (entry / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RecordError, match="delete the folder .* to train it again"):
        warm_run(tmp_path / "c", smoke_suite, smoke_splits, tmp_path / "cache")


def test_an_interrupted_clean_model_resumes(tmp_path, smoke_suite, smoke_splits):
    suite = with_train(smoke_suite, epochs=3)

    def train_part(folder, s):
        Trainer(RunSpec(s.name, "standard", (), 0), s, smoke_splits, folder, device=CPU,
                progress=False).train(stop_after_epochs=1)
    with pytest.raises(RecordError, match="stopped after epoch 1 of 3"):
        service.obtain_clean_model(tmp_path, suite, 0, "fp32", train_part, progress=False)
    folder = service.cache_dir(tmp_path, suite, 0, "fp32")
    assert not (folder / "model.pt").exists()

    def train_all(folder, s):
        Trainer(RunSpec(s.name, "standard", (), 0), s, smoke_splits, folder, device=CPU,
                progress=False).train()
    made = service.obtain_clean_model(tmp_path, suite, 0, "fp32", train_all, progress=False)
    plain = train(tmp_path / "std", suite, smoke_splits, method="standard")
    assert_same_state(model_state(plain.run_dir), made.weights)
    assert len(read_history(folder / "train" / "history.jsonl")) == 3


def test_resume_never_retrains_the_clean_model(tmp_path, smoke_suite, smoke_splits,
                                               monkeypatch):
    suite = with_train(smoke_suite, epochs=3)
    cache = tmp_path / "cache"
    warm_run(tmp_path / "full", suite, smoke_splits, cache)
    calls = count_trainings(monkeypatch)
    warm_run(tmp_path / "cut", suite, smoke_splits, cache, stop=1)
    assert calls == []  # cached by the first run
    import shutil

    shutil.rmtree(cache)  # even without the cache, resuming needs no clean model
    _, probe = warm_run(tmp_path / "cut", suite, smoke_splits, cache)
    assert calls == [] and not cache.exists() and probe.received is None
    assert_same_state(model_state(tmp_path / "full"), model_state(tmp_path / "cut"))
    for run in ("full", "cut"):
        (entry,) = load_checkpoint(tmp_path / run / "last.pt")["pretraining"]
        assert entry["kind"] == "clean_model" and entry["epochs"] == 3


def test_progress_lines_and_quiet(tmp_path, smoke_suite, smoke_splits, capsys):
    warm_run(tmp_path / "a", smoke_suite, smoke_splits, tmp_path / "cache")
    assert capsys.readouterr().out == ""
    warm_run(tmp_path / "b", smoke_suite, smoke_splits, tmp_path / "c2", progress=True)
    captured = capsys.readouterr()
    assert "clean model for smoke seed 0: standard training for 2 epochs" in captured.out
    assert "clean model (standard) seed 0" in captured.err  # its own progress bar
    warm_run(tmp_path / "c", smoke_suite, smoke_splits, tmp_path / "c2", progress=True)
    assert "clean model for smoke seed 0: reusing" in capsys.readouterr().out


WARM_FILE = """
from defenses.base import Defense, DefenseCard

class WarmFile(Defense):
    card = DefenseCard(name="WarmFile", paper="test")
    capabilities = ("clean_model",)

    def setup(self, state):
        assert state.clean_model is not None
"""


def test_record_and_leaderboard_declare_it_with_its_cost(tmp_path, smoke_suite):
    suite = replace(smoke_suite, eval=replace(smoke_suite.eval, autoattack="none",
                                              sanity_checks=False))
    results = tmp_path / "results"
    module = tmp_path / "warm.py"
    module.write_text(WARM_FILE)
    warm_spec = DefenseSpec(f"{module}:WarmFile")
    run_one(RunSpec("smoke", "at"), results, progress=False, suite=suite, threads=1)
    warm = run_one(RunSpec("smoke", "at", (warm_spec,)), results, progress=False, suite=suite,
                   threads=1)
    record = json.loads(warm.record_path.read_text())
    (extra,) = record["extra_pretraining"]
    entry = results / "smoke" / "_clean_models" / extra["where"].rsplit("/", 1)[-1]
    assert extra["where"] == str(entry) and (entry / "model.pt").exists()
    assert extra["what"] == "clean model (standard training, 2 epochs)"
    assert extra["seconds"] > 0 and extra["forward_passes"] == extra["backward_passes"] > 0
    cost = record["cost"]
    assert cost["pretraining_seconds"] == extra["seconds"]
    assert cost["pretraining_forward_passes"] == extra["forward_passes"]
    table = compile_tables(load_records(results), current_hashes={
        "smoke": suite.protocol_hash})["smoke"].set_index("row")
    row, at = table.loc["AT+WarmFile"], table.loc["AT"]
    assert row["extra_pretraining"].startswith("clean model (standard training, 2 epochs) (")
    assert row["pretraining_seconds_mean"] == pytest.approx(extra["seconds"], abs=1e-6)
    per_epoch = row["seconds_per_epoch_mean"] + extra["seconds"] / 2
    assert row["cost_vs_base"] == pytest.approx(per_epoch / at["seconds_per_epoch_mean"], rel=1e-4)
    train_passes = cost["forward_passes"] + cost["backward_passes"]
    assert row["passes_mean"] == train_passes + 2 * extra["forward_passes"]
    assert at["extra_pretraining"] == "" and at["cost_vs_base"] == 1.0


def test_the_clean_model_budget_is_an_optional_suite_field(smoke_suite):
    text = '[data]\ndataset = "synthetic"\n[model]\nname = "small_cnn"\n[train]\nepochs = 4\n'
    plain = parse_suite(text, "s", "t")
    assert plain.clean_model.epochs == 0 and plain.clean_model_epochs == 4
    explicit = parse_suite(text + "[clean_model]\nepochs = 0\n", "s", "t")
    assert explicit.protocol_hash == plain.protocol_hash
    longer = parse_suite(text + "[clean_model]\nepochs = 7\n", "s", "t")
    assert longer.clean_model_epochs == 7 and longer.protocol_hash != plain.protocol_hash
    for bad in ("-1", "2.5", "true"):
        with pytest.raises(ConfigError, match=r"\[clean_model\]: epochs must be an integer"):
            parse_suite(text + f"[clean_model]\nepochs = {bad}\n", "s", "t")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\]"):
        parse_suite(text + "[clean_model]\nlr = 0.1\n", "s", "t")


# --------------------------------------------------------------------------- recipes


def test_recipes_resolve_on_the_suite_and_get_their_own_cache_entries(smoke_suite, tmp_path):
    """A defense's recipe (augmentation, share of the epochs, lr decays) is part of the
    key; the default recipe keeps the key it had before recipes existed."""
    from bench.config import load_suite

    def key(how=service.DEFAULT_RECIPE, suite=smoke_suite):
        return service.cache_key(suite, 0, "fp32", how)

    legacy = {"format": service.FORMAT, "suite": "smoke", "protocol": smoke_suite.protocol_hash,
              "model": {"name": "small_cnn", "kwargs": smoke_suite.model.kwargs}, "seed": 0,
              "recipe": {"method": "standard", "epochs": 2, "precision": "fp32"}}
    import hashlib
    assert key() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    recipes = [service.CleanRecipe(augment="none"), service.CleanRecipe(epoch_share=0.5),
               service.CleanRecipe(milestones=(0.5, 0.75)),
               service.CleanRecipe(augment="none", epoch_share=0.2, milestones=(0.5, 0.75))]
    keys = [key(), *(key(r) for r in recipes)]
    assert len(set(keys)) == len(keys)
    assert key(service.CleanRecipe(augment="none")) == keys[1]  # equal recipes share
    # 40/200 of a 200-epoch suite, no augmentation, decays at epochs 20 and 30
    paper = load_suite("cifar10-linf")
    trained = recipes[-1].suite_for(paper)
    assert trained.train.epochs == 40 and trained.data.augment == "none"
    assert [m * trained.train.epochs for m in trained.train.milestones] == [20, 30]
    assert trained.train.lr == paper.train.lr and paper.data.augment == "crop_flip"
    assert recipes[-1].epochs(smoke_suite) == 1  # round(0.4), at least one epoch
    assert service.DEFAULT_RECIPE.suite_for(paper) == service.clean_suite(paper)
    for bad in ({"augment": "mixup"}, {"epoch_share": 0}, {"milestones": (0.5, 1.0)}):
        with pytest.raises(ConfigError, match="clean-model recipe"):
            service.CleanRecipe(**bad)


class PlainProbe(WarmProbe):
    name = "plain_probe"
    clean_model_recipe = service.CleanRecipe(augment="none", epoch_share=0.5)


def test_each_recipe_trains_on_what_it_declares(tmp_path, smoke_suite, smoke_splits,
                                                monkeypatch):
    """Two defenses, two recipes: each entry is trained once, each defense gets its own
    model, and the no-augmentation model's training batches are raw training images bit
    for bit (a spy on the network's input), while the suite's flip shows in the other's."""
    seen: dict[str, list[torch.Tensor]] = {}
    original_build = Trainer.build

    def spying_build(self):
        state = original_build(self)
        if self.spec.method == "standard":
            rows = seen.setdefault(self.run_dir.parent.name, [])
            self.model.register_forward_pre_hook(
                lambda module, args: rows.append(args[0].detach().clone())
                if module.training else None)
        return state
    monkeypatch.setattr(Trainer, "build", spying_build)
    default, plain = WarmProbe(), PlainProbe()
    cache = tmp_path / "cache"
    trainer = Trainer(RunSpec("smoke", "at", (), 0), smoke_suite, smoke_splits, tmp_path / "r",
                      device=CPU, progress=False, clean_models_dir=cache)

    def build():
        state = spying_build(trainer)
        trainer.defenses = [default, plain]
        for d in trainer.defenses:
            d.bind_random_stream(0, CPU)
        trainer._bind_defenses()
        return state
    trainer.build = build  # type: ignore[method-assign]
    trainer.train(stop_after_epochs=1)  # each probe records what its setup saw
    entries = {how: service.cache_dir(cache, smoke_suite, 0, "fp32", how)
               for how in (service.DEFAULT_RECIPE, PlainProbe.clean_model_recipe)}
    assert sorted(p.name for p in cache.iterdir()) == sorted(e.name for e in entries.values())
    for probe in (default, plain):
        saved = load_checkpoint(entries[probe.clean_model_recipe] / "model.pt")["model"]
        assert_same_state(saved, probe.received.state_dict())
    facts = {e["for"][0]: e for e in trainer.pretraining}
    assert facts["plain_probe"]["recipe"]["augment"] == "none"
    assert facts["plain_probe"]["epochs"] == 1 and facts["warm_probe"]["epochs"] == 2
    assert facts["plain_probe"]["seconds"] > 0 and facts["plain_probe"]["forward_passes"] > 0
    raw = smoke_splits.train.x.float().div(255).flatten(1)

    def is_raw(rows: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(rows).contiguous().flatten(1)
        return (flat[:, None, :] == raw[None]).all(2).any(1)

    batches = len(smoke_splits.train.y) // smoke_suite.train.batch_size
    no_aug = seen[entries[PlainProbe.clean_model_recipe].name]
    flipped = seen[entries[service.DEFAULT_RECIPE].name]
    assert len(no_aug) == batches and len(flipped) == 2 * batches
    assert is_raw(no_aug).all()
    assert not is_raw(flipped).all() and is_raw(flipped).any()  # the control: flip shows
