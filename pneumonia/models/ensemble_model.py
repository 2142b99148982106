"""An ensemble of trained classifiers as one model (`model.name ensemble`): stacking (a
logistic regression on the members' logits) or soft voting (the mean of their probabilities).

`python -m pneumonia.ensemble` writes it from members' checkpoints, fitting the stacking
coefficients on their shared validation images; nobody writes `model.ensemble` by hand. Its
config (`ModelConfig.ensemble`) is plain values, so it travels in the checkpoint's recipe:

    rule       "stacking" or "soft_vote"
    members    one dict per member: model (its ModelConfig as a dict), mean and std (its pixel
               normalisation), image_size, classes, positive_class, name (where it came from)
    coef       stacking: one coefficient per member logit; soft_vote: the vote's weights (1/K)
    intercept  stacking: the intercept; soft_vote: 0

The ensemble's own recipe normalises with mean 0 and std 1, so its input is pixels in [0, 1];
each member applies its own `(x - mean) / std`. A member's P(pneumonia) is the softmax of its
positive class (two classes) or 1 - the softmax of NORMAL (more classes: every other class
is a kind of pneumonia). With z_k = logit(clamp(P_k, 1e-6, 1 - 1e-6)), stacking gives
s = intercept + sum_k coef_k z_k, soft voting s = logit(sum_k coef_k P_k). The logits are
[-s/2, s/2] (NORMAL, PNEUMONIA), so the softmax of PNEUMONIA is sigmoid(s) and the NORMAL logit
has a gradient too. Each member's softmax is taken in float32, as the member's own module takes
it for its run's predictions.csv (what the coefficients were fitted on); from there on the
arithmetic is float64 (float32 cannot hold 1 - 1e-6 to the precision the clamp needs). The
coefficients are also persistent float64 buffers (`coef`, `intercept`): the state dict alone
scores as the config says. State-dict keys: `members.<k>.<member's keys>`.

Grad-CAM reads one layer of one network, and no layer of an ensemble carries all its members'
evidence: asking for it (`pneumonia.inference.explain.target_layer`, through `layer4`) is a one-line
UserError rather than a map of the last member alone.
"""

from __future__ import annotations

import torch
from torch import nn

from pneumonia.core.errors import UserError
from pneumonia.models.factory import MODELS, ModelConfig, create_model

RULES = ("stacking", "soft_vote")
NEGATIVE_CLASS = "NORMAL"  # every other class of a member is a kind of pneumonia
EPS = 1e-6  # member probabilities are clamped to [EPS, 1 - EPS] before the logit
MEMBER_KEYS = ("model", "mean", "std", "image_size", "classes", "positive_class", "name")


def pneumonia_index(classes: list[str] | tuple[str, ...], positive_class: str) -> tuple[int, bool]:
    """(class index, complement): a member's P(pneumonia) is softmax[:, index] of its logits,
    or 1 minus it when `complement` (members of more than two classes: 1 - P(NORMAL))."""
    classes = list(classes)
    if len(classes) == 2:
        if positive_class not in classes or positive_class == NEGATIVE_CLASS:
            raise ValueError(
                f"a two-class member needs a pneumonia positive class, not {positive_class!r}"
            )
        return classes.index(positive_class), False
    if NEGATIVE_CLASS not in classes:
        raise ValueError(f"a member of classes {classes} has no {NEGATIVE_CLASS} class")
    return classes.index(NEGATIVE_CLASS), True


def clamped_logit(p: torch.Tensor) -> torch.Tensor:
    """logit(clamp(p, EPS, 1 - EPS)): a member's probability on the scale stacking combines."""
    return torch.logit(p.clamp(EPS, 1 - EPS))


class Ensemble(nn.Module):
    """Members' P(pneumonia) combined by stacking or soft voting; logits [B, 2]."""

    coef: torch.Tensor  # buffers (register_buffer), typed for the type checker
    intercept: torch.Tensor

    def __init__(
        self,
        members: list[nn.Module],
        means: list[float],
        stds: list[float],
        picks: list[tuple[int, bool]],
        rule: str,
        coef: list[float],
        intercept: float,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"ensemble rule {rule!r}: choose one of {', '.join(RULES)}")
        if not len(members) == len(means) == len(stds) == len(picks) == len(coef) >= 1:
            raise ValueError("an ensemble needs one mean, std, class and coefficient per member")
        self.members = nn.ModuleList(members)
        self.means = [float(m) for m in means]
        self.stds = [float(s) for s in stds]
        self.picks = [(int(i), bool(c)) for i, c in picks]
        self.rule = rule
        self.register_buffer("coef", torch.tensor(coef, dtype=torch.float64))
        self.register_buffer("intercept", torch.tensor(float(intercept), dtype=torch.float64))

    @property
    def layer4(self) -> nn.Module:
        """What `pneumonia.inference.explain.target_layer` asks the ResNet family for: refused."""
        raise UserError(
            "Grad-CAM cannot explain an ensemble (no one layer holds all its members' "
            "evidence): score it without heatmaps, or explain each member's checkpoint"
        )

    def member_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, K] float64: each member's P(pneumonia) for images [B, 1, S, S] in [0, 1]."""
        out = []
        for member, mean, std, (index, complement) in zip(
            self.members, self.means, self.stds, self.picks, strict=True
        ):
            p = member((images - mean) / std).float().softmax(dim=1)[:, index].double()
            out.append(1 - p if complement else p)
        return torch.stack(out, dim=1)

    def score(self, probs: torch.Tensor) -> torch.Tensor:
        """[B] float64: the ensemble's logit s of P(pneumonia) from the members' [B, K].
        Elementwise products, not a matmul: CUDA autocast would take a matmul to bfloat16."""
        if self.rule == "stacking":
            return self.intercept + (clamped_logit(probs) * self.coef).sum(dim=1)
        return clamped_logit((probs * self.coef).sum(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.score(self.member_probabilities(images)).float()
        return torch.stack([-s / 2, s / 2], dim=1)


def member_config(member: dict) -> ModelConfig:
    """A member's ModelConfig (its weights come from the ensemble's state dict)."""
    return ModelConfig(**member["model"])


@MODELS.register("ensemble")
def ensemble(cfg: ModelConfig) -> nn.Module:
    """The ensemble `cfg.ensemble` describes (written by `python -m pneumonia.ensemble`)."""
    spec = cfg.ensemble
    if spec is None:
        raise UserError(
            "model.name ensemble is made from trained checkpoints by python -m "
            "pneumonia.ensemble, not trained: choose another model.name"
        )
    if not isinstance(spec, dict) or not isinstance(spec.get("members"), list):
        raise ValueError("model.ensemble is not a dict with a list of members")
    missing = [k for k in ("rule", "coef", "intercept") if k not in spec]
    missing += [k for m in spec["members"] for k in MEMBER_KEYS if k not in m]
    if missing:
        raise ValueError(f"model.ensemble lacks {', '.join(sorted(set(missing)))}")
    members = spec["members"]
    return Ensemble(
        members=[
            create_model(member_config(m), m["image_size"], len(m["classes"])) for m in members
        ],
        means=[m["mean"] for m in members],
        stds=[m["std"] for m in members],
        picks=[pneumonia_index(m["classes"], m["positive_class"]) for m in members],
        rule=spec["rule"],
        coef=list(spec["coef"]),
        intercept=spec["intercept"],
    )
