"""The classify route's losses: cross-entropy per (category, attribute) head, with the seeds' variants.

A missing or masked label (target -100) contributes nothing: it is never filled and never a class.
On top of plain CE: label smoothing, class-balanced weights from the effective number of samples
(Cui et al. 2019, beta), focal loss (Lin et al. 2017, gamma), LDAM margins (Cao et al. 2019) with
deferred re-weighting, and a weight per attribute. Each reduces to plain CE at its neutral setting
(beta 0, gamma 0, margin 0 at scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class LossCfg:
    kind: str = "ce"  # ce | focal | cb_focal | ldam
    label_smoothing: float = 0.0
    beta: float | None = None  # class-balanced weights; None = none (cb_focal uses 0.999 when unset)
    gamma: float = 2.0  # focal
    max_margin: float = 0.5  # LDAM: the rarest class's margin
    scale: float = 30.0  # LDAM: logit scale
    drw_start: float = 0.8  # LDAM: share of training after which class-balanced weights switch on


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    n = counts.float().clamp(min=1)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), n.double())).float() \
        if beta > 0 else torch.ones_like(n)
    return w * (len(w) / w.sum())


def ldam_margins(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """m_c proportional to n_c^(-1/4), the rarest class's margin equal to `max_margin`."""
    m = counts.float().clamp(min=1).pow(-0.25)
    return m * (max_margin / m.max())


def class_weights(cfg: LossCfg, counts: torch.Tensor, progress: float) -> torch.Tensor | None:
    """The per-class weights in force at `progress` (0..1 of training), or None for unweighted."""
    beta = cfg.beta if cfg.beta is not None else (0.999 if cfg.kind == "cb_focal" else None)
    if cfg.kind == "ldam":  # deferred re-weighting: plain until drw_start, class-balanced after
        if progress < cfg.drw_start:
            return None
        beta = 0.999 if beta is None else beta
    return class_balanced_weights(counts, beta) if beta is not None else None


def head_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LossCfg, counts: torch.Tensor,
              progress: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed loss over the rows whose target is known, and how many there were.

    Callers divide the sum over every head by the total count, so each known label weighs the same
    whatever head it belongs to (times its class and attribute weights).
    """
    known = targets != IGNORE
    n = int(known.sum())
    if n == 0:
        return logits.sum() * 0.0, 0  # keeps the graph (DDP) while adding nothing
    z, t = logits[known].float(), targets[known]
    if cfg.kind == "ldam":
        margins = ldam_margins(counts, cfg.max_margin).to(z.device)
        z = (z - F.one_hot(t, z.shape[-1]) * margins[t][:, None]) * cfg.scale
    ce = F.cross_entropy(z, t, reduction="none", label_smoothing=cfg.label_smoothing)
    if cfg.kind in ("focal", "cb_focal") and cfg.gamma:
        p_true = torch.exp(-F.cross_entropy(z, t, reduction="none"))
        ce = (1.0 - p_true).pow(cfg.gamma) * ce
    weights = class_weights(cfg, counts, progress)
    if weights is not None:
        ce = ce * weights.to(ce.device)[t]
    return ce.sum(), n


@dataclass
class CategoryLoss:
    """One category's heads for `category_loss`: tables over [attributes, padded values]."""

    mask: torch.Tensor  # bool, True on real values
    margins: torch.Tensor  # LDAM margins (zero on padding)
    weights: torch.Tensor | None  # class-balanced weights once they are on (one on padding), else None
    attribute_weights: torch.Tensor  # [attributes]
    drw_start: float | None  # weights apply from this share of training on (LDAM); None: from the start

    def to(self, device: torch.device) -> None:
        """Moves the tables once, not on every step."""
        self.mask, self.margins = self.mask.to(device), self.margins.to(device)
        self.attribute_weights = self.attribute_weights.to(device)
        self.weights = None if self.weights is None else self.weights.to(device)


def category_loss_table(cfg: LossCfg, mask: torch.Tensor, counts: list[torch.Tensor],
                        attribute_weights: list[float]) -> CategoryLoss:
    """The per-head quantities of `head_loss` for one category, padded to its longest value list."""
    def padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
        out = torch.full(mask.shape, fill)
        for a, r in enumerate(rows):
            out[a, : len(r)] = r
        return out

    margins = padded([ldam_margins(n, cfg.max_margin) for n in counts], 0.0)
    late = [class_weights(cfg, n, 1.0) for n in counts]
    weights = None if late[0] is None else padded(late, 1.0)
    drw = cfg.drw_start if cfg.kind == "ldam" else None
    return CategoryLoss(mask, margins, weights, torch.tensor(attribute_weights, dtype=torch.float32), drw)


def category_loss(logits: torch.Tensor, targets: torch.Tensor, table: CategoryLoss, cfg: LossCfg,
                  progress: float = 0.0) -> tuple[torch.Tensor, int]:
    """`head_loss` for every head of one category at once, each head's sum times its attribute weight.

    logits [rows, attributes, padded values], targets [rows, attributes]: the same summed loss and
    known-label count as calling `head_loss` per head, without a Python loop over heads.
    """
    known = targets != IGNORE
    n = int(known.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    if table.mask.device != logits.device:
        table.to(logits.device)
    attr = known.nonzero(as_tuple=True)[1]
    mask = table.mask[attr]
    z, t = logits[known].float(), targets[known]
    if cfg.kind == "ldam":
        margin = table.margins[attr, t]
        z = (z - torch.nn.functional.one_hot(t, z.shape[-1]) * margin[:, None]) * cfg.scale
    logp = z.masked_fill(~mask, float("-inf")).log_softmax(-1)
    nll = -logp.gather(1, t[:, None])[:, 0]
    ce = nll
    if cfg.label_smoothing:  # F.cross_entropy's smoothing, spread over the head's own values only
        smooth = -logp.masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1)
        ce = (1.0 - cfg.label_smoothing) * nll + cfg.label_smoothing * smooth
    if cfg.kind in ("focal", "cb_focal") and cfg.gamma:
        ce = (1.0 - torch.exp(-nll)).pow(cfg.gamma) * ce
    if table.weights is not None and (table.drw_start is None or progress >= table.drw_start):
        ce = ce * table.weights[attr, t]
    return (ce * table.attribute_weights[attr]).sum(), n
