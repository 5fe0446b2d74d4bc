"""AROID's throughput rewrites (defenses/aroid.py, _aroid_space.py, augment_ops.py) against
what they replaced, written out here: the policy update's T trajectories scored as one
batch of T x N images (against the sequential loop, one trajectory at a time) and
`apply_ops`' fused op families (against running every op on every image, then selecting).
Both must give the same numbers bit for bit on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_aroid import _built, gen, spec

import defenses.aroid as aroid_module
from defenses import augment_ops as A
from defenses._aroid_policy import diversity_penalty, log_prob, sample_actions
from defenses._aroid_space import (
    COLOUR,
    HEADS,
    apply_actions,
    apply_drawn,
    by_image,
    concat_draws,
    repeat_batch,
    sample_residual,
)
from defenses.idbh import _APPLIED as IDBH_OPS

# --------------------------------------------------------------------------- apply_ops


def all_ops_then_select(x: torch.Tensor, names, choice: torch.Tensor,
                        magnitude: torch.Tensor) -> torch.Tensor:
    """`apply_ops` as it was: every op on the whole batch, the choice picks per image."""
    out = x
    for k, name in enumerate(names):
        out = torch.where((choice == k).view(-1, 1, 1, 1), A.OPS[name](x, magnitude), out)
    return out


#: a plausible magnitude range per op (signed where the op takes a sign)
RANGES = {"saturation": (0.0, 2.0), "brightness": (0.0, 2.0), "contrast": (0.0, 2.0),
          "sharpness": (0.0, 2.0), "rotate": (-30.0, 30.0), "shear_x": (-0.3, 0.3),
          "shear_y": (-0.3, 0.3), "translate_x": (-10.0, 10.0), "translate_y": (-10.0, 10.0),
          "solarize": (0.0, 1.1), "posterize": (1.0, 8.0)}


@pytest.mark.parametrize("names", [tuple(A.OPS), COLOUR.ops, IDBH_OPS,
                                   ("equalize", "rotate", "brightness", "rotate")],
                         ids=["all", "aroid", "idbh", "repeated"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_apply_ops_equals_every_op_then_select(names, channels, channels_last):
    g = gen(channels + 7 * channels_last + len(names))
    n = 12 * len(names)
    for quantised in (False, True):
        x = torch.rand(n, channels, 20, 24, generator=g)
        x = (x * 255).round() / 255 if quantised else x
        x[0] = 0.5  # a flat image (autocontrast's and contrast's edge case)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        choice = torch.randperm(n, generator=g) % len(names)  # every op, 12 images each
        choice[-1] = len(names)  # no op: left as it is
        lo, hi = zip(*(RANGES.get(names[k], (0.0, 1.0)) if k < len(names) else (0.0, 1.0)
                       for k in choice.tolist()))
        u = torch.rand(n, generator=g)
        magnitude = torch.tensor(lo) + (torch.tensor(hi) - torch.tensor(lo)) * u
        magnitude[::3] = magnitude[::3].round()  # integer pixels, bits, degrees too
        ours = A.apply_ops(x, names, choice, magnitude)
        expected = all_ops_then_select(x, names, choice, magnitude)
        assert torch.equal(ours, expected), (names, channels, channels_last, quantised)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert ours.is_contiguous(memory_format=fmt)
        assert ours.dtype == x.dtype and torch.equal(ours[-1], x[-1])
    with pytest.raises(KeyError, match="unknown augmentation op"):
        A.apply_ops(x, ("rotate", "blur"), choice % 2, magnitude)


# --------------------------------------------------------------------------- trajectories


def test_one_augmentation_of_t_trajectories_equals_t_augmentations():
    """T draws one after another then one augmentation of the T N batch gives what T
    separate `apply_actions` give with the same generator, and the same generator state."""
    x = torch.rand(8, 3, 32, 32, generator=gen(0)).contiguous(
        memory_format=torch.channels_last)
    logits = {h: torch.randn(8, k, generator=gen(1)) for h, k in HEADS.items()}
    g_seq, g_batch = gen(2), gen(2)
    expected, actions_seq = [], []
    for _ in range(3):
        a = sample_actions(logits, g_seq)
        actions_seq.append(a)
        expected.append(apply_actions(x, a, g_seq))
    drawn = []
    for _ in range(3):
        a = sample_actions(logits, g_batch)
        drawn.append((a, sample_residual(a, 32, 32, g_batch)))
    actions, residual = concat_draws(drawn)
    ours = apply_drawn(repeat_batch(x, 3), actions, residual)
    assert torch.equal(ours, torch.cat(expected))
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(g_seq.get_state(), g_batch.get_state())
    lp = log_prob(logits, {h: a.view(3, 8).T for h, a in actions.items()})
    assert torch.equal(lp, torch.stack([log_prob(logits, a) for a in actions_seq], 1))
    rows = torch.arange(24.0)  # row t N + i -> image i, trajectory t
    assert torch.equal(by_image(rows, 3), torch.tensor([[i + 8.0 * t for t in range(3)]
                                                        for i in range(8)]))


def sequential_update(aroid, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy update as it was before batching, written out: the T trajectories one
    after another, each its own augmentation, attack (through the engine's service) and
    reward forwards; passes counted as it counted them. Returns (log pi, R), N x T."""
    policy, g, lam, model = aroid.policy.train(), aroid.generator, aroid.lam(state), state.model
    x, y, _ = state.draw_batch(augment=False)
    logits = policy(x)
    with torch.no_grad():
        ce_clean = F.cross_entropy(aroid.affinity(x), y, reduction="none")
    logprobs, vul, aff = [], [], []
    for _ in range(aroid.trajectories):
        a = sample_actions(logits, g)
        x_aug = apply_actions(x, a, g)
        logprobs.append(log_prob(logits, a))
        model.eval()
        with torch.no_grad():
            ce_aug = F.cross_entropy(model(x_aug), y, reduction="none")
        x_adv = state.attack(x_aug, y, steps=2, step_size=state.eps / 4, random_start=False,
                             attack_bn="eval")
        with torch.no_grad():
            vul.append(F.cross_entropy(model(x_adv), y, reduction="none") - ce_aug)
            aff.append((F.cross_entropy(aroid.affinity(x_aug), y, reduction="none")
                        - ce_clean).clamp_min(0))
        model.train()
    logprob, rewards = torch.stack(logprobs, 1), torch.stack(vul, 1) - lam * torch.stack(aff, 1)
    advantage = rewards - rewards.mean(1, keepdim=True)
    loss = -(logprob * advantage).mean() + aroid.beta_div * diversity_penalty(
        logits, aroid.div_lower, aroid.div_upper)
    aroid.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    aroid.optimizer.step()
    aroid.optimizer.zero_grad(set_to_none=True)
    state.counter.add(fwd=2 + 3 * aroid.trajectories, bwd=1)
    return logprob.detach(), rewards


@pytest.mark.parametrize("chunk", [0, 1, 3, 9])
def test_batched_update_equals_the_sequential_loop(tmp_path, smoke_suite, smoke_splits, chunk,
                                                   monkeypatch):
    """Same draws, rewards and log-probabilities (bit for bit), pass counts, and policy
    step (to float rounding) as the loop; `reward_chunk` trajectories per attack call
    (0 and 9: all at once; 3 of 4: an uneven split)."""
    t = 4
    params = {"lambdas": 0.4, "trajectories": t}
    old_trainer, old_state = _built(tmp_path / "old", smoke_suite, smoke_splits, spec(**params))
    monkeypatch.setenv("ROBENCH_AROID_REWARD_CHUNK", str(chunk))
    new_trainer, new_state = _built(tmp_path / "new", smoke_suite, smoke_splits, spec(**params))
    (old,), (new,) = old_trainer.defenses, new_trainer.defenses
    old_counts = old_state.counter.forward, old_state.counter.backward
    new_counts = new_state.counter.forward, new_state.counter.backward
    new_inputs = new_state.counter.input_backward
    expected_logprob, expected_rewards = sequential_update(old, old_state)
    seen = []
    reinforce = aroid_module.reinforce_loss

    def spy(logprob, rewards):
        seen.append((logprob.detach(), rewards))
        return reinforce(logprob, rewards)

    aroid_module.reinforce_loss = spy
    try:
        new.update_policy(new_state)
    finally:
        aroid_module.reinforce_loss = reinforce
    ((logprob, rewards),) = seen
    assert rewards.shape == (smoke_suite.train.batch_size, t)
    assert torch.equal(rewards, expected_rewards) and torch.equal(logprob, expected_logprob)
    assert torch.equal(old.generator.get_state(), new.generator.get_state())
    assert torch.equal(old_trainer.stream_gen.get_state(), new_trainer.stream_gen.get_state())
    for (name, a), b in zip(old.policy.named_parameters(), new.policy.parameters()):
        # the log-probabilities' backward sums the T trajectories in another order
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9, msg=name)
    assert new.optimizer.state_dict()["state"].keys() == old.optimizer.state_dict()[
        "state"].keys()
    # passes per batch of N: policy, clean affinity; per trajectory 2 target forwards, the
    # 2-step PGD (2 + 2), 1 affinity forward; the policy backward
    steps = 2
    fwd, bwd = 2 + t * (2 + steps + 1), t * steps + 1
    assert (new_state.counter.forward - new_counts[0],
            new_state.counter.backward - new_counts[1]) == (fwd, bwd)
    assert (old_state.counter.forward - old_counts[0],
            old_state.counter.backward - old_counts[1]) == (fwd, bwd)
    # of the backwards, the attacks' t x steps compute input gradients only
    assert new_state.counter.input_backward - new_inputs == t * steps
    assert new_state.attack_overrides_log == old_state.attack_overrides_log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_augmentation_on_cuda_never_syncs_and_matches_cpu():
    """The trajectories' draws and the one augmentation of the T N batch (fused ops
    included) issue no host synchronisation; the result matches the CPU's on the same
    draws (nearest-neighbour geometry may round a few pixels differently)."""
    dev = torch.device("cuda")
    x = torch.rand(64, 3, 32, 32, generator=gen(0)).contiguous(
        memory_format=torch.channels_last)
    logits = {h: torch.randn(64, k, generator=gen(1), device="cpu").to(dev)
              for h, k in HEADS.items()}
    g = torch.Generator(device=dev).manual_seed(0)

    def augment(images: torch.Tensor) -> torch.Tensor:
        drawn = []
        for _ in range(4):
            a = sample_actions(logits, g)
            drawn.append((a, sample_residual(a, 32, 32, g)))
        return apply_drawn(repeat_batch(images, 4), *concat_draws(drawn))

    augment(x.to(dev))  # warm-up: lazy initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(x.to(dev, non_blocking=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (256, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    actions = {h: torch.randint(0, k, (64,), generator=gen(2)) for h, k in HEADS.items()}
    residual = sample_residual(actions, 32, 32, gen(3))
    moved = type(residual)(residual.coins.to(dev), tuple(t.to(dev) for t in residual.crop),
                           tuple(t.to(dev) for t in residual.erase))
    on_cpu = apply_drawn(x, actions, residual)
    on_cuda = apply_drawn(x.to(dev), {h: a.to(dev) for h, a in actions.items()}, moved).cpu()
    assert ((on_cpu - on_cuda).abs() < 1e-4).float().mean() > 0.99
