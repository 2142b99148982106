"""Differential privacy of training (DP-SGD, Abadi et al. 2016) with Opacus: the `privacy.*`
config group, the checks that refuse what cannot be private, and `DPSGD`, which makes one
trainer's module private (a central run's, or one federated client's, kept across rounds).

What Opacus does and this module does not redo: per-sample gradients (its hooks), clipping
and noise (its `DPOptimizer`), Poisson sampling (its `UniformWithReplacementSampler`, used by
the DataModule), the accountant (RDP or PRV) and the noise for a target epsilon. What is
ours: wiring them into a LightningModule whose state-dict keys must not change (checkpoints,
aggregation and FedBN's keys depend on them), so the hooks sit beside the model instead of
wrapping it, and a fresh `DPOptimizer` wraps each fit's optimizer.

The protected unit is one training image of one trainer (a hospital's image, in a
federation): (epsilon, delta) bounds what anyone holding the trained weights, or every
update a client sent, can learn about whether that image was used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal

import timm.layers
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from pneumonia.core.bounds import NonNegativeFloat, OpenUnitInterval, PositiveFloat, PositiveInt
from pneumonia.core.errors import UserError, first_line
from pneumonia.data.datamodule import PoissonBatches
from pneumonia.data.tasks import task_classes
from pneumonia.models.factory import IN_CHANS


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """The root logger's handlers and level as they were before the block."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# Opacus calls logging.basicConfig when imported (opacus/utils/module_utils.py), which gives
# the root logger a stderr handler: every library's records that reach the root (Flower's
# SecAgg+ stages) would then be printed. Import it once here and keep the root logger as the
# importer had it (the DataModule's lazy import of Opacus's sampler then finds it imported).
with _root_logger_kept():
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier
    from opacus.grad_sample import GradSampleHooks, register_grad_sampler
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
    from opacus.validators import ModuleValidator


@functools.cache
def _register_timm_group_norm() -> None:
    """timm's GroupNorm subclasses torch's, and Opacus looks samplers up by exact type: without
    this its layers silently fall back to the slower functorch path. Opacus's registry is
    process-wide, so it is filled when DP-SGD is first used, not when this module is imported.
    """
    register_grad_sampler(timm.layers.GroupNorm)(compute_group_norm_grad_sample)


def grad_sample_hooks(model: nn.Module, loss_reduction: str) -> GradSampleHooks:
    """Opacus's per-sample gradient hooks on `model` (timm's GroupNorm by its own sampler)."""
    _register_timm_group_norm()
    return GradSampleHooks(model, loss_reduction=loss_reduction)


@dataclass
class PrivacyConfig:
    """DP-SGD on every trainer (`privacy.*`): each image's gradient is clipped to L2 norm
    `max_grad_norm`, Gaussian noise of std noise_multiplier x max_grad_norm is added to each
    batch's sum, and batches are Poisson samples (each image in with probability B / N).
    Give the noise (`noise_multiplier`) or the budget of the whole run (`target_epsilon`: the
    noise that ends the last epoch or round at that epsilon), not both."""

    enabled: bool = False  # train with DP-SGD (Opacus); the keys below apply only then
    # Noise std / max_grad_norm, the same for every step; or null, with target_epsilon.
    noise_multiplier: NonNegativeFloat | None = None
    # The epsilon the whole run may spend (the noise is chosen to end there); or null,
    # with noise_multiplier.
    target_epsilon: PositiveFloat | None = None
    max_grad_norm: PositiveFloat = 1.0  # C: each image's gradient is clipped to this L2 norm
    # The chance that the guarantee fails outright; must stay below 1 / N for every trainer
    # of N images (1e-5: below 1 / 100,000).
    delta: OpenUnitInterval = 1e-5
    # How epsilon is counted (Opacus's accountants): rdp (Renyi DP) or prv (privacy loss
    # random variables).
    accountant: Literal["rdp", "prv"] = "rdp"
    # Logical batches (Opacus's BatchMemoryManager): data.batch_size is the expected Poisson
    # batch, the one the accountant knows; it passes through the model in chunks of at most
    # this many images and the optimizer steps once per batch. null: one chunk.
    physical_batch_size: PositiveInt | None = None
    # Augmentation multiplicity (De et al. 2022): K augmented copies of every image, whose K
    # gradients are averaged before clipping: each image still moves the sum by at most C.
    augment_multiplicity: PositiveInt = 1
    # Fixed weights per class (in data's class order) on each image's *clipped* gradient,
    # divided by their largest: no image moves the sum by more than C, so they cost no privacy.
    # Fixed numbers, not the trainer's class counts (those would make every weight depend on
    # every image). null: all 1.
    class_weights: list[PositiveFloat] | None = None

    def batches(self) -> PoissonBatches:
        """How the DataModule serves training batches under DP-SGD."""
        return PoissonBatches(self.physical_batch_size, self.augment_multiplicity)


def check_privacy(cfg) -> None:
    """What DP-SGD rules out, before any data is read (cfg: the fit config). Raises UserError."""
    p = cfg.privacy
    if not p.enabled:
        if set_without_dp := _changed_settings(p):
            key = f"privacy.{set_without_dp[0]}"
            raise UserError(
                f"{key} is set but privacy.enabled is false, so training would not be private: "
                f"set privacy.enabled true, or drop {key}"
            )
        return
    if (p.noise_multiplier is None) == (p.target_epsilon is None):
        raise UserError(
            "privacy: give exactly one of privacy.noise_multiplier and privacy.target_epsilon"
        )
    trainer = cfg.trainer
    refusals = [
        (
            cfg.data.balance == "sampler",
            "data.balance sampler is not Poisson sampling: use data.balance none with "
            "privacy.class_weights (fixed, after clipping)",
        ),
        (
            cfg.data.balance == "loss_weights",
            "data.balance loss_weights weighs each image's loss before clipping, which undoes "
            "it, by weights read from the trainer's class counts, which the guarantee does not "
            "cover: use data.balance none with privacy.class_weights (fixed, after clipping) "
            "or threshold youden",
        ),
        (
            p.augment_multiplicity > 1 and not cfg.data.augment.enabled,
            f"privacy.augment_multiplicity {p.augment_multiplicity} needs data.augment.enabled "
            "true (without augmentation the copies are the same image)",
        ),
        (
            p.physical_batch_size is not None and cfg.optim.interval == "step",
            "privacy.physical_batch_size with optim.interval step would step the schedule once "
            "per chunk: use optim.interval epoch",
        ),
        (
            p.class_weights is not None
            and len(p.class_weights) != len(task_classes(cfg.data.task)),
            f"privacy.class_weights has {len(p.class_weights or [])} weights for the "
            f"{len(task_classes(cfg.data.task))} classes {list(task_classes(cfg.data.task))}: "
            "give one per class, in that order",
        ),
        (
            cfg.federated.enabled and cfg.federated.strategy == "fedprox",
            "federated.strategy fedprox edits gradients that DP-SGD then replaces: use fedavg, "
            "fedbn, fedavgm or fedadam",
        ),
        (
            (trainer.get("accumulate_grad_batches") or 1) > 1,
            "trainer.accumulate_grad_batches above 1 is not Poisson sampling: raise "
            "data.batch_size instead",
        ),
        (
            trainer.get("gradient_clip_val") is not None,
            "trainer.gradient_clip_val: DP-SGD clips each image's gradient itself "
            "(privacy.max_grad_norm)",
        ),
        (
            cfg.loss.name != "cross_entropy",
            f"loss.name {cfg.loss.name}: DP-SGD here clips per-image cross-entropy gradients "
            "(other objectives couple images or hold their own weights): use cross_entropy",
        ),
        (
            cfg.optim.l1 > 0,
            "optim.l1: the penalty's gradient is not any image's, and Opacus clips only "
            "per-image gradients: use optim.weight_decay (decoupled, outside the clipping)",
        ),
        (
            cfg.model.norm == "brn",
            "model.norm brn mixes the images of a batch like BatchNorm: use gn",
        ),
        (
            cfg.model.mixstyle > 0,
            "model.mixstyle mixes the feature statistics of the images of a batch, so no "
            "image has a gradient of its own: use data.augment.randconv (per image)",
        ),
        (
            cfg.model.drop_connect > 0,
            "model.drop_connect masks the classifier's weights, which Opacus's per-sample "
            "gradients of Linear do not follow: use model.drop_rate",
        ),
        (
            str(trainer.get("precision")).startswith("16"),
            "trainer.precision 16-mixed scales the loss and Opacus clips the scaled per-sample "
            "gradients: use 32-true or bf16-mixed",
        ),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(f"privacy.enabled: {why}")


def _changed_settings(cfg: PrivacyConfig) -> list[str]:
    """The privacy.* settings that differ from their defaults (a run's config.yaml holds every
    key, at its default unless someone set it)."""
    default = PrivacyConfig()
    return [
        f.name
        for f in fields(cfg)
        if f.name != "enabled" and getattr(cfg, f.name) != getattr(default, f.name)
    ]


def check_budget(cfg, images: dict[str, int]) -> None:
    """What the privacy settings ask of each trainer's images, once their counts are known and
    before a run directory exists: delta below 1 / N, and a target epsilon that DP-SGD can
    reach (cfg: the fit config; images: trainer name -> its training images)."""
    p = cfg.privacy
    check_delta(p.delta, images)
    if p.target_epsilon is None:
        return
    fl = cfg.federated
    epochs = fl.rounds * fl.local_epochs if fl.enabled else int(cfg.trainer.max_epochs or 1)
    batch = cfg.data.batch_size
    for who, n in images.items():
        rate, steps = sample_rate(n, batch), planned_steps(n, batch, epochs)
        floor = smallest_epsilon(p, rate, steps)
        if p.target_epsilon < floor or not _reachable(p, rate, steps):
            raise UserError(
                f"privacy.target_epsilon {p.target_epsilon:g} is below what DP-SGD can reach "
                f"for {who} at privacy.delta {p.delta:g} with the {p.accountant} accountant "
                f"({floor:.3g}, however much noise is added): raise privacy.target_epsilon to "
                f"{_rounded_up(floor)} or more"
            )


def _reachable(cfg: PrivacyConfig, rate: float, steps: int) -> bool:
    try:
        noise_for_budget(cfg, rate, steps)  # cached: the trainer's DPSGD asks again
    except ValueError:  # Opacus's "The privacy budget is too low"
        return False
    return True


def _rounded_up(value: float) -> str:
    """`value` rounded up to two significant digits: 0.1029 -> "0.11"."""
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return f"{math.ceil(value / step) * step:.2g}"


def smallest_epsilon(cfg: PrivacyConfig, rate: float, steps: int) -> float:
    """The epsilon of `steps` steps at `rate` under the most noise Opacus's search tries: no
    target below it can be met (RDP's conversion alone gives about log(1 / delta) / 62)."""
    accountant = create_accountant(cfg.accountant)
    accountant.history = [(MAX_SIGMA / 2, rate, max(steps, 1))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=cfg.delta))


def check_private_model(model: nn.Module, name: str) -> None:
    """Refuse a model Opacus cannot train privately, in one line naming the fix."""
    errors = ModuleValidator.validate(model, strict=False)
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if batchnorm or any("BatchNorm" in str(e) for e in errors):
        raise UserError(
            f"privacy.enabled: model {name} has BatchNorm, which mixes the images of a batch "
            f"so no image has a gradient of its own: use GroupNorm (model.norm gn)"
        )
    if errors:
        raise UserError(f"privacy.enabled: model {name}: {first_line(errors[0], 200)}")


def probe_per_image_gradients(model: nn.Module, name: str, image_size: int) -> None:
    """Run two images forward and backward through a copy of `model` under Opacus's hooks:
    a model that edits a hooked layer's output in place (timm's plain ResNet adds its
    shortcut with +=) fails here, in one line, instead of in the first training step."""
    trial = copy.deepcopy(model)
    no_inplace(trial)
    hooks = grad_sample_hooks(trial, loss_reduction="sum")
    try:
        trial(torch.rand(2, IN_CHANS, image_size, image_size)).sum().backward()
    except RuntimeError as err:
        raise UserError(
            f"privacy.enabled: model {name} cannot give each image its own gradient under "
            f"Opacus ({first_line(err).split('. ')[0]}): use se_resnet18 with model.norm gn"
        ) from None
    finally:
        hooks.remove_hooks()


def check_delta(delta: float, images: dict[str, int]) -> None:
    """delta must stay below 1 / N for every trainer (name -> its image count)."""
    for who, n in images.items():
        if delta >= 1.0 / n:
            raise UserError(
                f"privacy.delta {delta:g} must be below 1 / {n} ({who}'s training images): "
                f"lower it, e.g. to {10 ** math.floor(math.log10(0.1 / n)):g}"
            )


def no_inplace(model: nn.Module) -> None:
    """Turn off in-place activations: a ReLU that overwrites a hooked layer's output breaks
    Opacus's backward hooks (timm's blocks use inplace=True)."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            # torch types a Module's attributes as tensors or modules; `inplace` is a flag.
            module.inplace = False  # type: ignore[assignment]


def noise_for_budget(cfg: PrivacyConfig, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose `steps` Poisson steps at `sample_rate` end at
    privacy.target_epsilon (Opacus's own search), or privacy.noise_multiplier."""
    if cfg.target_epsilon is None:
        assert cfg.noise_multiplier is not None  # check_privacy: one of the two, never neither
        return float(cfg.noise_multiplier)
    return _searched_noise(
        cfg.target_epsilon, cfg.delta, sample_rate, max(steps, 1), cfg.accountant
    )


@functools.lru_cache(maxsize=64)
def _searched_noise(
    epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """Opacus's search, once per process for the same inputs: preflight's check and the
    trainer's DPSGD ask the same (PRV's search takes seconds)."""
    with warnings.catch_warnings():  # PRV's "optimal order" notes
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=rate,
                steps=steps,
                accountant=accountant,
            )
        )


class DPSGD:
    """One trainer's DP-SGD: per-sample gradient hooks on `model`, the accountant, and the
    private optimizer each fit gets (`wrap`). `make_private` attaches it to a module.

    `images`: the trainer's training images (N); `batch_size`: the expected batch (B; the
    sample rate is B / N); `planned_steps`: the optimizer steps of the whole run, over which
    a target epsilon is spread. Counts by keyword: three ints are easy to swap."""

    def __init__(
        self,
        model: nn.Module,
        cfg: PrivacyConfig,
        *,
        images: int,
        batch_size: int,
        planned_steps: int,
        name: str = "model",
    ) -> None:
        check_private_model(model, name)
        check_delta(cfg.delta, {"this trainer": images})
        no_inplace(model)
        self.cfg = cfg
        self.batch_size = batch_size
        self.sample_rate = sample_rate(images, batch_size)
        self.noise_multiplier = noise_for_budget(cfg, self.sample_rate, planned_steps)
        self.accountant = create_accountant(cfg.accountant)
        # In a list: an nn.Module attribute would join the module tree and its state dict.
        self._hooks = [grad_sample_hooks(model, loss_reduction="mean")]
        self._hooks[0].forbid_grad_accumulation()
        self.optimizer: PrivateOptimizer | None = None  # this fit's (wrap)

    def wrap(self, optimizer: torch.optim.Optimizer) -> PrivateOptimizer:
        """This fit's optimizer, made private; every step it takes is counted."""
        private = PrivateOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
            multiplicity=self.cfg.augment_multiplicity,
            class_weights=self.cfg.class_weights,
        )
        private.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.sample_rate))
        self.optimizer = private
        return private

    def before_backward(self, labels: torch.Tensor, ends_step: bool = True) -> None:
        """What the next optimizer step needs from the training step: each image's label (for
        privacy.class_weights; K rows per image under augment multiplicity) and whether this
        chunk ends its logical batch (privacy.physical_batch_size)."""
        optimizer = self.optimizer
        assert optimizer is not None, "DPSGD.before_backward before wrap"
        optimizer.labels = labels[:: self.cfg.augment_multiplicity]
        optimizer.signal_skip_step(do_skip=not ends_step)

    def epsilon(self) -> float:
        """Epsilon spent so far at privacy.delta (0 before the first step)."""
        if len(self.accountant) == 0:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.accountant.get_epsilon(delta=self.cfg.delta))

    def steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def describe(self) -> dict:
        """The guarantee, as plain values (summary.json, the model card)."""
        return {
            "mechanism": "DP-SGD (Opacus)",
            "epsilon": round(self.epsilon(), 4),
            "delta": self.cfg.delta,
            "accountant": self.cfg.accountant,
            "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.cfg.max_grad_norm,
            "sample_rate": round(self.sample_rate, 6),
            "steps": self.steps(),
        }

    def state_dict(self) -> dict:
        """The accountant's history, as plain floats and ints (weights-only loadable)."""
        history = [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]
        return {"history": history, "mechanism": self.cfg.accountant}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = [tuple(entry) for entry in state["history"]]


class PrivateOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with two steps of the DP-SGD regime between its per-image
    gradients and their sum: augmentation multiplicity averages each image's K rows before
    clipping, and fixed class weights (at most 1) scale each image's clipped gradient. Both keep
    every image's contribution to the sum within C, so Opacus's noise and accounting hold."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        multiplicity: int = 1,
        class_weights: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self.multiplicity = multiplicity
        weights = torch.tensor(class_weights, dtype=torch.float) if class_weights else None
        self.class_weights = None if weights is None else weights / weights.max()
        self.labels: torch.Tensor | None = None  # the images' labels, set each training step

    def clip_and_accumulate(self) -> None:
        if self.multiplicity > 1:
            self._average_copies()
        if self.class_weights is None:
            super().clip_and_accumulate()
            return
        # Opacus's clip_and_accumulate, with each image's clip factor times its class's weight.
        samples = self.grad_samples
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1)
        factor = (self.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        assert self.labels is not None, "PrivateOptimizer: labels not set before the step"
        factor = factor * self.class_weights.to(factor.device)[self.labels.to(factor.device)]
        for p, grad_sample in zip(self.params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = torch.einsum("i,i...", factor.to(p.dtype), grad_sample.to(p.dtype))
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def _average_copies(self) -> None:
        """Each image's gradient: the mean of its K copies' (rows i*K .. i*K + K - 1)."""
        for p in self.params:
            g = p.grad_sample
            if isinstance(g, torch.Tensor) and len(g):
                copies = g.reshape(len(g) // self.multiplicity, self.multiplicity, *g.shape[1:])
                p.grad_sample = copies.mean(1)


def make_private(
    module, cfg: PrivacyConfig, *, images: int, batch_size: int, planned_steps: int
) -> DPSGD:
    """DP-SGD for a ClassifierModule, attached as `module.privacy`, which the module consults
    for its loss, its optimizer and its memory layout."""
    name = module.hparams.model["name"]
    dpsgd = DPSGD(
        module.model,
        cfg,
        images=images,
        batch_size=batch_size,
        planned_steps=planned_steps,
        name=name,
    )
    module.privacy = dpsgd
    return dpsgd


def rdp_accountant() -> RDPAccountant:
    """Opacus's RDP accountant (server-side DP keeps its own)."""
    return RDPAccountant()


def sample_rate(images: int, batch_size: int) -> float:
    """q = B / N: each image's chance to be in a batch."""
    return min(batch_size / images, 1.0)


def planned_steps(images: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of `epochs` epochs of Poisson batches: int(1 / q) each, as Opacus's
    sampler draws them."""
    return epochs * int(1 / sample_rate(images, batch_size))


class AccountantState(Callback):
    """Keeps a central run's accountant in its Lightning checkpoints, so `--resume` goes on
    from the epsilon already spent instead of from 0."""

    def __init__(self, dpsgd: DPSGD) -> None:
        self.dpsgd = dpsgd

    def state_dict(self) -> dict:
        return self.dpsgd.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.dpsgd.load_state_dict(state_dict)
