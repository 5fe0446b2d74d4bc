"""The operations of CURE (Gowda, Zonooz & Arani, "Conserve-Update-Revise to Cure
Generalization and Robustness Trade-off in Adversarial Training", ICLR 2024), as plain
functions on tensors and modules: the objectives, the consistency with the revision
model, the gradient-prominence masks ("conserve") and the stochastic revision update.
`defenses/cure.py` wires them to the engine's hooks; docs/defenses/cure.md describes them.

Masks index parameters in their logical (row-major) order, so they do not depend on the
memory format (channels_last) of the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities: sum_k p_k (log p_k - log q_k). The same
    operations as the engine's TRADES loss, so that CURE at zero strength is TRADES bit for
    bit."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p(x) || p(x_adv)), differentiable through both sides (TRADES)."""
    return kl_rows(F.log_softmax(logits_clean, dim=1), F.log_softmax(logits_adv, dim=1))


def trades_objective(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """Per-sample CE(f(x), y) + beta * KL(p(x) || p(x_adv)) (L_adv: beta 5 in the released
    code's default, 1 in the paper's Eq. 4)."""
    ce = F.cross_entropy(logits_clean, y, reduction="none")
    return ce + beta * trades_kl(logits_clean, logits_adv)


def rgp_objective(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                  alpha_c: float) -> torch.Tensor:
    """Per-sample alpha_c CE(f(x), y) + (1 - alpha_c) CE(f(x_adv), y) (reference `rgp`)."""
    return (alpha_c * F.cross_entropy(logits_clean, y, reduction="none")
            + (1 - alpha_c) * F.cross_entropy(logits_adv, y, reduction="none"))


def consistency(logits_clean: torch.Tensor, logits_adv: torch.Tensor,
                revision_clean: torch.Tensor, revision_adv: torch.Tensor) -> torch.Tensor:
    """L_CR = KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv)), batch means, the
    revision model's outputs detached (the targets)."""
    total = logits_clean.new_zeros(())
    for student, target in ((logits_clean, revision_clean), (logits_adv, revision_adv)):
        log_target = F.log_softmax(target.detach().float(), dim=1)
        total = total + kl_rows(log_target, F.log_softmax(student.float(), dim=1)).mean()
    return total


def conserved_count(percent: float, n: int) -> int:
    """Entries of a layer of n that are conserved: round(percent / 100 * n), halves up."""
    return min(n, math.floor(percent * n / 100 + 0.5))


class ConserveLayout:
    """The conserve masks of a fixed list of tensor shapes, all at once.

    The scores of all masked tensors arrive as one vector (each tensor flattened in logical,
    row-major order, one after another: `flat_logical`). In each tensor ("segment") of n
    entries, exactly `conserved_count(percent, n)` entries are conserved: the lowest scores,
    ties by the lower flat index; -0.0 and +0.0 are the same score. One stable sort of the
    whole vector by the key (segment, score) orders every segment by score, its ties by
    position; the sorted order is segment after segment with the same sizes, so whether the
    j-th sorted entry is conserved (its rank in its segment below that segment's k) does not
    depend on the scores: a vector computed once. Per call: the keys, one sort and one
    scatter, whatever the number of tensors (the per-tensor selection ran one single-block
    `kthvalue` and about fifteen small kernels per tensor). No host sync. Scores must be
    finite float32.

    That is the GPU's way (`method="sort"`, the default on CUDA). On the CPU a full sort of
    millions of scores costs several times the per-tensor selection (measured: 746 ms
    against 258 ms a step for PreActResNet-18's masks), so there the default is
    `method="select"`: per tensor, its k-th smallest score (`kthvalue`), everything below
    it, then the tied entries by position until k are conserved. Both give the same masks
    (tests/test_cure.py checks them against each other and against a hand case)."""

    def __init__(self, shapes: list[torch.Size], percent: float, device: torch.device,
                 method: str | None = None) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.percent, self.device = percent, torch.device(device)
        self.method = method or ("sort" if self.device.type == "cuda" else "select")
        if self.method not in ("sort", "select"):
            raise ValueError(f"cure: unknown mask method {self.method!r}")
        self.ks = [conserved_count(percent, n) for n in self.sizes]
        self.total = sum(self.sizes)
        sizes = torch.tensor(self.sizes, dtype=torch.int64, device=self.device)
        starts = torch.cumsum(sizes, 0) - sizes
        ks = torch.tensor([conserved_count(percent, n) for n in self.sizes],
                          dtype=torch.int64, device=self.device)
        segment = torch.repeat_interleave(
            torch.arange(len(self.sizes), device=self.device), sizes, output_size=self.total)
        self.key_base = segment * 2**32  # keeps the segments apart, in order
        rank = torch.arange(self.total, device=self.device) - starts[segment]
        self.conserved_sorted = rank < ks[segment]

    def matches(self, shapes: list[torch.Size], percent: float, device: torch.device) -> bool:
        return ([torch.Size(s) for s in shapes] == self.shapes and percent == self.percent
                and torch.device(device) == self.device)

    def conserved(self, flat_score: torch.Tensor) -> torch.Tensor:
        """Flat boolean vector, True at the entries to conserve."""
        if flat_score.shape != (self.total,):
            raise ValueError(f"cure: {flat_score.numel()} scores for a layout of {self.total}")
        if self.method == "select":
            return self._conserved_by_selection(flat_score.float())
        # float32 -> int32 bits -> an integer whose order is the float order (negatives:
        # all but the sign bit flipped); + 0.0 makes -0.0 into +0.0 (a tie, as before)
        bits = (flat_score.float() + 0.0).view(torch.int32).to(torch.int64)
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        order = torch.sort(self.key_base + bits, stable=True).indices
        out = torch.empty(self.total, dtype=torch.bool, device=flat_score.device)
        return out.scatter_(0, order, self.conserved_sorted)

    def _conserved_by_selection(self, flat_score: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.total, dtype=torch.bool, device=flat_score.device)
        for score, conserve, k in zip(flat_score.split(self.sizes), out.split(self.sizes),
                                      self.ks, strict=True):
            if k >= score.numel():
                conserve.fill_(True)
            elif k > 0:
                kth = torch.kthvalue(score, k).values
                below = score < kth
                ties = score == kth  # -0.0 == +0.0: a tie, as in the sort
                conserve.copy_(below | (ties & (torch.cumsum(ties, 0) <= k - below.sum())))
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector in the layout's shapes (logical order)."""
        return [part.view(s) for part, s in
                zip(flat.split(self.sizes), self.shapes, strict=True)]


def flat_logical(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened in logical (row-major) order and concatenated: one copy into
    a fresh vector, whatever their memory format (channels_last)."""
    sizes = [t.numel() for t in tensors]
    out = torch.empty(sum(sizes), dtype=torch.float32, device=tensors[0].device)
    views = [part.view(t.shape) for part, t in zip(out.split(sizes), tensors, strict=True)]
    torch._foreach_copy_(views, tensors)
    return out


def update_mask(score: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of `score`'s shape, False ("conserve") at exactly
    `conserved_count(percent, n)` entries with the lowest score (ties: the lower flat
    index first), True ("update") elsewhere. One tensor through `ConserveLayout`."""
    layout = ConserveLayout([score.shape], percent, score.device)
    return ~layout.conserved(flat_logical([score])).view(score.shape)


def prominence(grad_clean: torch.Tensor, grad_adv: torch.Tensor, alpha_c: float) -> torch.Tensor:
    """The paper's revision gradient prominence per weight (mode `paper`):
    alpha_c |dCE(x)/dw| + (1 - alpha_c) |dCE(x_adv)/dw|."""
    return alpha_c * grad_clean.float().abs() + (1 - alpha_c) * grad_adv.float().abs()


def signed_prominence(grad_ce: torch.Tensor, grad_kl: torch.Tensor,
                      alpha_c: float) -> torch.Tensor:
    """The released code's score (mode `rgp_soft`), signed, no absolute value:
    alpha_c dCE(x)/dw + (1 - alpha_c) dKL(p(x) || p(x_adv))/dw. The weights conserved are
    those with the lowest signed score."""
    return alpha_c * grad_ce.float() + (1 - alpha_c) * grad_kl.float()


def block_first_convs(model: nn.Module) -> list[int]:
    """Positions, in `[p for p in model.parameters() if p.requires_grad]`, of the parameters
    that the released `rgp_soft` mode masks: those of a module named `conv1` (the first
    convolution of each residual block in the ResNets), except the network's first
    parameter (the stem convolution, also named `conv1`). None in a plain CNN."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [i for i, n in enumerate(names) if i > 0 and "conv1" in n.split(".")[:-1]]


def clean_epochs(fraction: float, epochs: int) -> int:
    """Epochs of clean training before CURE: round(fraction * epochs), halves up."""
    return math.floor(fraction * epochs + 0.5)


def conserve_(params: list[torch.Tensor], flat_score: torch.Tensor, percent: float,
              layout: ConserveLayout | None = None) -> ConserveLayout | None:
    """Zero, in each parameter's `.grad`, the entries whose score is among the lowest
    `percent` of that parameter (layer); `flat_score` holds the scores of all `params`
    (`flat_logical` order). Parameters without a gradient are skipped. Returns the layout
    used (pass it back next time: it is reused while the shapes match)."""
    if percent <= 0 or not params:
        return layout
    shapes = [p.shape for p in params]
    if layout is None or not layout.matches(shapes, percent, flat_score.device):
        layout = ConserveLayout(shapes, percent, flat_score.device)
    conserve = layout.split(layout.conserved(flat_score))
    for p, mask in zip(params, conserve, strict=True):
        if p.grad is not None:
            p.grad.masked_fill_(mask, 0.0)
    return layout


def last_linear_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the last `nn.Linear` module (the classifier), which the
    reference's `rgp` mode never masks."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def revision_decay(mode: str, decay: float, step: int) -> float:
    """The revision model's EMA decay: d (`paper`); min(1 - 1/(t + 1), d) with t the number
    of CURE steps taken so far, this one included (the released code, `rgp_soft`, `rgp`)."""
    if mode == "paper":
        return decay
    return min(1 - 1 / (step + 1), decay)


@torch.no_grad()
def revise_(revision: nn.Module, model: nn.Module, decay: float, gate: torch.Tensor) -> None:
    """theta_rev <- decay * theta_rev + (1 - decay) * theta for the parameters (buffers are
    left alone) where the boolean scalar `gate` is True; unchanged where False (for finite
    weights: the update is r * 1 + p * 0 then, which also turns a -0.0 into +0.0). The gate
    is folded into the two weights (decay, 1 - decay where on; 1, 0 where off), so three
    foreach operations cover all parameters and nothing is read back to the host; where on,
    the values are those of `r * decay + p * (1 - decay)` bit for bit."""
    rev = list(revision.parameters())
    cur = [p.detach() for p in model.parameters()]
    if len(rev) != len(cur):
        raise ValueError("cure: the revision model does not match the student")
    keep = torch.where(gate, decay, 1.0)
    take = torch.where(gate, 1 - decay, 0.0)
    torch._foreach_mul_(rev, keep)
    torch._foreach_add_(rev, torch._foreach_mul(cur, take))
