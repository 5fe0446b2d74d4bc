"""AROID (Li, Qiu & Spratling, "AROID: Improving Adversarial Robustness Through Online
Instance-Wise Data Augmentation", IJCV 2024). The algorithm, its hyperparameters, every
known difference from the authors' code and the published numbers: docs/defenses/aroid.md.

A policy network looks at each clean training image and picks, per image, one class of each
of four augmentation heads (flip, CropShift, a colour/shape op with its magnitude, erasing;
`defenses/_aroid_space.py`); the augmented image replaces the batch before the attack. The
policy is learned online so that its augmentations are hard for the current target model
(vulnerability), close to the data distribution (affinity) and diverse:

  r_vul = CE(f(rho(x^)), y) - CE(f(x^), y)       rho: PGD, 2 steps of eps/4 from zero, f in
                                                 eval mode (the suite's attack, overridden)
  r_aff = max(0, CE(f_aff(x^), y) - CE(f_aff(x), y))   f_aff: the clean model, eval mode,
                                                 of AFFINITY_RECIPE (no augmentation)
  R = r_vul - lambda_stage * r_aff               lambda per learning-rate stage
  L = -mean(log pi(a|x) * (R - mean_T R)) + beta_div * L_div   T trajectories per image

updated every K iterations on a batch of the second stream (`state.draw_batch`), with SGD
(lr 1e-3, momentum 0.9, no weight decay) and the gradient norm clipped to 1. For the first
`warmup_epochs` epochs the target trains with no augmentation at all and the policy rests.

Engine-specific choices:
- The update runs in `before_attack`, before the batch's augmentation is sampled (the
  reference's order), when (step - first policy step + 1) is a multiple of K, counting
  steps over the whole run (the reference counts within each epoch).
- The policy network (and its BatchNorm) runs in train mode, as in the reference; the
  backbone is the model zoo's network with its classifier stripped (`backbone`: a model
  name, default PreActResNet-18, or "suite" for the suite's own architecture).
- lambda's stage is the number of learning-rate decays passed (piecewise schedules; 0 for
  others). r_vul uses the current training eps.
- The T trajectories are scored as ONE batch of T x N images (the reference loops over
  them, T attacks of N images): their actions and residual draws are taken one trajectory
  after another, exactly the numbers the loop draws, then one augmentation of the T N
  batch, and the reward attack and forwards on all T at once on a GPU, one trajectory at
  a time on the CPU (faster there), or ROBENCH_AROID_REWARD_CHUNK at a time. Everything
  there is in eval mode, so on CPU the rewards equal the loop's bit for bit
  (tests/test_aroid_batched.py); passes are counted per batch of N.
- Sampling is an inverse CDF on the defense's own stream, which also draws what is left
  random within a class (CropShift's split and offsets, signs, erased boxes).
- The diversity penalty is the reference code's (`_aroid_policy.py`): one pooled count
  per head, joint log-probabilities at both levels of the colour head.
- The affinity model is the engine's clean model under AFFINITY_RECIPE: standard training
  without augmentation for 40/200 of the suite's epochs (at least 1; 40 on the 200-epoch
  suites, as the reference), lr decays at 50% and 75% of them (20 and 30 of 40).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bench.clean_model import CleanRecipe
from bench.config import ConfigError, ModelConfig
from bench.models import build_model, list_models
from bench.state import TrainState, seeded_global_rng
from defenses._aroid_card import CARD, check_integer, check_number, parse_lambdas
from defenses._aroid_policy import (
    PolicyNet,
    diversity_penalty,
    feature_extractor,
    log_prob,
    reinforce_loss,
    sample_actions,
)
from defenses._aroid_reward import (
    affinity_loss,
    reward_chunk_from_environment,
    vulnerability,
)
from defenses._aroid_space import (
    apply_actions,
    apply_drawn,
    by_image,
    concat_draws,
    max_crop_shift,
    repeat_batch,
    sample_residual,
)
from defenses.base import Defense, register_defense

GRAD_CLIP, POLICY_MOMENTUM = 1.0, 0.9
#: the affinity model's training: the reference's 40 epochs of a 200-epoch budget, no
#: augmentation, lr decays at epochs 20 and 30 (scaled with the suite's epochs)
AFFINITY_RECIPE = CleanRecipe(augment="none", epoch_share=40 / 200, milestones=(0.5, 0.75))


@register_defense("aroid")
class AROID(Defense):
    """AROID (Li, Qiu & Spratling, IJCV 2024): an online, per-image augmentation policy
    learned for vulnerability, affinity and diversity (see the module docstring)."""

    card = CARD
    params = {"backbone": "preact_resnet18", "trajectories": 8, "update_every": 5,
              "warmup_epochs": 5, "lambdas": (0.4, 0.2, 0.1), "beta_div": 0.8,
              "div_lower": 0.1, "div_upper": 0.3, "policy_lr": 1e-3, "reward_steps": 2}
    methods = ("at",)
    slots = ("augmentation",)
    capabilities = ("raw_batch", "clean_model")
    clean_model_recipe = AFFINITY_RECIPE

    def __init__(self, backbone: str = "preact_resnet18", trajectories: int = 8,
                 update_every: int = 5, warmup_epochs: int = 5,
                 lambdas: Any = (0.4, 0.2, 0.1), beta_div: float = 0.8,
                 div_lower: float = 0.1, div_upper: float = 0.3, policy_lr: float = 1e-3,
                 reward_steps: int = 2) -> None:
        stages = parse_lambdas(lambdas)
        super().__init__(backbone=backbone, trajectories=trajectories,
                         update_every=update_every, warmup_epochs=warmup_epochs,
                         lambdas=list(stages), beta_div=beta_div, div_lower=div_lower,
                         div_upper=div_upper, policy_lr=policy_lr, reward_steps=reward_steps)
        if not isinstance(backbone, str) or backbone not in ("suite", *list_models()):
            raise ConfigError(f"aroid: backbone must be 'suite' (the suite's architecture) or "
                              f"one of {list_models()}, got {backbone!r}")
        self.backbone, self.lambdas = backbone, stages
        self.trajectories = check_integer("trajectories", trajectories, 2)
        self.update_every = check_integer("update_every", update_every, 1)
        self.warmup_epochs = check_integer("warmup_epochs", warmup_epochs, 0)
        self.beta_div = check_number("beta_div", beta_div, 0.0)
        self.div_lower = check_number("div_lower", div_lower, 0.0, 1.0, high_open=True)
        self.div_upper = check_number("div_upper", div_upper, 0.0)
        self.policy_lr = check_number("policy_lr", policy_lr, 0.0, low_open=True)
        self.reward_steps = check_integer("reward_steps", reward_steps, 1)
        # memory only, not a parameter of the method: it changes no result (CPU: bit for
        # bit), so it is read from the environment and never part of the run's identity
        self.reward_chunk = reward_chunk_from_environment()
        self.uses_affinity = any(v > 0 for v in self.lambdas)
        self.capabilities = ("raw_batch", "clean_model") if self.uses_affinity else (
            "raw_batch",)
        self.policy: PolicyNet | None = None
        self.affinity: nn.Module | None = None
        self.optimizer: torch.optim.SGD | None = None
        self.updates = 0  # policy updates so far
        self.affinity_is_clean = False  # the affinity model came from the clean model

    # ---- setup ------------------------------------------------------------------
    def setup(self, state: TrainState) -> None:
        """Build the policy network (random init from the defense's own stream), its
        optimizer and the frozen affinity model (the clean model on a fresh run; on resume
        a placeholder that the checkpoint overwrites)."""
        info = state.data_info
        if info is None:
            raise RuntimeError("aroid: the engine gave no data_info (image shape)")
        if max_crop_shift() >= info.size:
            raise ConfigError(f"aroid: the crop head shifts up to {max_crop_shift()} px, too "
                              f"much for {info.size} x {info.size} images")
        cfg = (state.suite.model if self.backbone == "suite"
               else ModelConfig(self.backbone, {}))
        with seeded_global_rng(self._stream(), state.device):
            net, features = feature_extractor(build_model(cfg, info))
            policy = PolicyNet(net, features)
        policy = policy.to(state.device)
        if state.channels_last:
            policy = policy.to(memory_format=torch.channels_last)
        self.policy = policy.train()
        self.optimizer = torch.optim.SGD(self.policy.parameters(), lr=self.policy_lr,
                                         momentum=POLICY_MOMENTUM, weight_decay=0.0)
        if self.uses_affinity:
            source = state.clean_model if state.clean_model is not None else state.model
            self.affinity = copy.deepcopy(source).eval().requires_grad_(False)
            self.affinity_is_clean = state.clean_model is not None

    def _stream(self) -> torch.Generator:
        if self.generator is None:
            raise RuntimeError("aroid: no random stream; call bind_random_stream first")
        return self.generator

    def _policy(self) -> PolicyNet:
        if self.policy is None:
            raise RuntimeError("aroid: setup() was not called (no policy network)")
        return self.policy

    # ---- schedule -----------------------------------------------------------------
    def active(self, state: TrainState) -> bool:
        return state.epoch >= self.warmup_epochs

    def update_due(self, state: TrainState) -> bool:
        start = self.warmup_epochs * state.batches_per_epoch
        return self.active(state) and (state.step - start + 1) % self.update_every == 0

    def stage(self, state: TrainState) -> int:
        """Learning-rate decays passed so far (piecewise schedule; 0 otherwise)."""
        t = state.suite.train
        if t.schedule != "piecewise":
            return 0
        return sum(state.progress >= m for m in t.milestones)

    def lam(self, state: TrainState) -> float:
        return self.lambdas[min(self.stage(state), len(self.lambdas) - 1)]

    # ---- the augmentation -------------------------------------------------------
    def before_attack(self, state: TrainState) -> None:
        assert state.raw_x is not None, "the engine did not provide the raw batch"
        if not self.active(state):
            state.x = state.raw_x  # warm-up: no augmentation at all
            return
        if self.update_due(state):
            self.update_policy(state)
        state.x = self.augment(state, state.raw_x)

    def augment(self, state: TrainState, x: torch.Tensor) -> torch.Tensor:
        """Sample one augmentation per image from the policy and apply it."""
        policy = self._policy().train()
        with torch.no_grad(), state.autocast():
            logits = policy(x)
        state.counter.add(fwd=1)
        return apply_actions(x, sample_actions(logits, self._stream()), self._stream())

    # ---- the policy update --------------------------------------------------------
    def update_policy(self, state: TrainState) -> None:
        """One REINFORCE step on a fresh batch of the second stream (T trajectories per
        image, per-image baseline, diversity penalty, gradient norm clipped to 1), the T
        trajectories scored as one batch, row t N + i = image i, trajectory t."""
        policy, gen = self._policy().train(), self._stream()
        assert self.optimizer is not None
        lam = self.lam(state)
        if lam > 0 and not self.affinity_is_clean:
            raise RuntimeError("aroid: no clean model for the affinity reward (the engine's "
                               "clean_model service was not run before setup)")
        x, y, _ = state.draw_batch(augment=False)
        with state.autocast():
            logits = policy(x)
        state.counter.add(fwd=1)
        ce_clean = self._affinity_loss(state, x, y) if lam > 0 else None
        t, n = self.trajectories, x.shape[0]
        drawn = []
        for _ in range(t):  # the reference's per-trajectory draws, in its order
            actions = sample_actions(logits, gen)
            drawn.append((actions, sample_residual(actions, *x.shape[2:], gen)))
        actions, residual = concat_draws(drawn)
        x_aug = apply_drawn(repeat_batch(x, t), actions, residual)  # T N images
        y_aug = y.repeat(t)
        logprob = log_prob(logits, {h: a.view(t, n).T for h, a in actions.items()})  # N x T
        vul = by_image(self._vulnerability(state, x_aug, y_aug, t), t)
        if ce_clean is not None:
            aff = (by_image(self._affinity_loss(state, x_aug, y_aug, t), t)
                   - ce_clean[:, None]).clamp_min(0)
        else:
            aff = torch.zeros_like(vul)
        loss = reinforce_loss(logprob, vul - lam * aff)
        div = diversity_penalty(logits, self.div_lower, self.div_upper)
        if self.beta_div > 0:
            loss = loss + self.beta_div * div
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.counter.add(bwd=1)
        nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        state.log("aroid.r_vul", vul.mean())
        state.log("aroid.r_aff", aff.mean())
        state.log("aroid.diversity", div.detach())

    def _vulnerability(self, state: TrainState, x_aug: torch.Tensor, y: torch.Tensor,
                       trajectories: int = 1) -> torch.Tensor:
        """r_vul per image (`_aroid_reward.vulnerability`)."""
        return vulnerability(state, x_aug, y, trajectories, self.reward_chunk,
                             self.reward_steps)

    def _affinity_loss(self, state: TrainState, x: torch.Tensor, y: torch.Tensor,
                       batches: int = 1) -> torch.Tensor:
        """CE of the affinity model per image (`_aroid_reward.affinity_loss`)."""
        assert self.affinity is not None
        return affinity_loss(state, self.affinity, x, y, batches, self.reward_chunk)

    # ---- checkpoint -------------------------------------------------------------
    def get_extra_state(self) -> Any:
        extra = super().get_extra_state()
        extra.update(optimizer=None if self.optimizer is None else self.optimizer.state_dict(),
                     updates=self.updates, affinity_is_clean=self.affinity_is_clean)
        return extra

    def set_extra_state(self, extra: Any) -> None:
        super().set_extra_state(extra)
        if extra.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(extra["optimizer"])
        self.updates = int(extra.get("updates", 0))
        self.affinity_is_clean = bool(extra.get("affinity_is_clean", False))

    def eval_models(self, state: TrainState) -> dict[str, nn.Module]:
        return {}  # the policy and the affinity model are training aids, not evaluated

