"""``linear-probe``: multinomial logistic regression on frozen, normalised image embeddings.

The probe is fitted with full-batch L-BFGS in torch, on whatever device the evaluation runs
(CLIP_benchmark's probe needs CUDA). Its objective is sklearn's ``LogisticRegression`` one,
``mean cross-entropy + weight_decay / 2 * |W|^2`` (the bias unpenalised; ``C = 1 / (n *
weight_decay)``). Each ``weight_decays`` value is fitted on the training part less a
validation split; the one with the best validation accuracy (the largest on a tie) is refitted
on the whole training part and scored on the test part: ``acc1``, ``acc5`` (at least 5
classes), ``mean_per_class_recall``, and the ``weight_decay`` chosen.

Training data: ``train_dataset`` (a dataset entry, e.g. ``{type: synthetic-shapes, size:
2000, seed: 5}``) with the evaluation dataset as the test part; without it the evaluation
dataset is split at random (``test_fraction``, seeded).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

import clipforge
from clipforge import EncoderBundle, Sample, embed_images, get_plugin_manager
from clipforge.plugins.evaluators.zero_shot import classes_of, label_check

NAME = "linear-probe"


class LinearProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train_dataset: dict[str, Any] | None = Field(
        None, description="dataset entry ({type: ..., ...}) to fit on; default: a split of the evaluation dataset"
    )
    test_fraction: float = Field(0.5, gt=0, lt=1, description="without train_dataset: the evaluation data held out")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="of the training data, held out to pick weight_decay")
    weight_decays: list[Annotated[float, Field(ge=0)]] = Field(
        [1e-4, 1e-3, 1e-2, 1e-1], min_length=1, description="L2 penalties tried"
    )
    max_iter: int = Field(100, gt=0, description="L-BFGS iterations per fit")
    seed: int = Field(0, description="seeds the splits")
    batch_size: int = Field(256, gt=0, description="images per forward pass")

    @field_validator("train_dataset")
    @classmethod
    def _has_type(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("type"), str):
            raise ValueError("a dataset entry needs 'type' (the dataset's name)")
        return v


@dataclass
class LinearProbe:
    """Logistic regression on frozen image embeddings, L2 penalty picked on a validation split."""

    train_dataset: dict[str, Any] | None = None
    test_fraction: float = 0.5
    val_fraction: float = 0.2
    weight_decays: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    #: ``weight_decay`` in the result is the penalty chosen, a setting: logged as a param, not a metric
    hyperparameters: tuple[str, ...] = field(default=("weight_decay",), init=False)
    #: It learns the classes: a set without them is refused before a run starts.
    needs_classes: ClassVar[bool] = True
    max_iter: int = 100
    seed: int = 0
    batch_size: int = 256

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch

        classes = classes_of(dataset, NAME)
        x, y = self._features(bundle, dataset, device, classes, "test" if self.train_dataset else "")
        generator = torch.Generator().manual_seed(self.seed)
        if self.train_dataset is None:
            order = torch.randperm(len(y), generator=generator)
            n_test = round(len(y) * self.test_fraction)
            (x_test, y_test), (x_train, y_train) = (x[order[:n_test]], y[order[:n_test]]), (x[order[n_test:]], y[order[n_test:]])
        else:
            train = _create_dataset(self.train_dataset)
            train_classes = classes_of(train, f"{NAME}: train_dataset")
            if train_classes != classes:
                raise clipforge.ConfigError(
                    f"{NAME}: train_dataset's classes differ from the evaluation dataset's ({len(train_classes)} vs {len(classes)})"
                )
            (x_test, y_test), (x_train, y_train) = (x, y), self._features(bundle, train, device, classes, "train")
        order = torch.randperm(len(y_train), generator=generator)
        n_val = round(len(y_train) * self.val_fraction)
        if n_val == 0 or n_val == len(y_train) or len(y_test) == 0:
            raise clipforge.ConfigError(
                f"{NAME}: too few samples ({len(y_train)} to train, {len(y_test)} to test) for a validation split"
            )
        val, fit = order[:n_val], order[n_val:]
        dev = torch.device(device)
        best_wd, best_acc = self.weight_decays[0], -1.0
        for wd in sorted(self.weight_decays):
            w, b = fit_logistic(x_train[fit].to(dev), y_train[fit].to(dev), len(classes), wd, self.max_iter)
            acc = ((x_train[val].to(dev) @ w.T + b).argmax(1).cpu() == y_train[val]).float().mean().item()
            if acc >= best_acc:  # ties go to the stronger penalty
                best_wd, best_acc = wd, acc
        w, b = fit_logistic(x_train.to(dev), y_train.to(dev), len(classes), best_wd, self.max_iter)
        logits = (x_test.to(dev) @ w.T + b).cpu()
        return {**classification_metrics(logits, y_test, len(classes)), "weight_decay": float(best_wd)}

    def _features(self, bundle, dataset, device, classes, part):
        import torch

        who = f"{NAME}: train_dataset" if part == "train" else NAME
        x, samples = embed_images(
            bundle, dataset, device, self.batch_size, desc=f"{NAME}: {part or 'images'}", check=label_check(len(classes), who)
        )
        if not samples:
            raise clipforge.ConfigError(f"{who}: the dataset is empty")
        return x, torch.tensor([s.label for s in samples])


def fit_logistic(x, y, n_classes: int, weight_decay: float, max_iter: int = 100):
    """Weights ``(C, D)`` and bias ``(C,)`` minimising mean cross-entropy + ``weight_decay/2 * |W|^2``."""
    import torch
    import torch.nn.functional as F

    x = x.double()
    w = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + weight_decay / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach().float(), b.detach().float()


def classification_metrics(logits, labels, n_classes: int) -> dict[str, float]:
    """acc1, acc5 (with at least 5 classes) and mean per-class recall, as CLIP_benchmark defines them."""
    import torch

    ranked = logits.topk(min(5, n_classes), dim=1).indices
    hits = ranked == labels[:, None]
    metrics = {"acc1": hits[:, 0].float().mean().item()}
    if n_classes >= 5:
        metrics["acc5"] = hits.any(dim=1).float().mean().item()
    per_class = torch.bincount(labels, weights=hits[:, 0].double(), minlength=n_classes)
    counts = torch.bincount(labels, minlength=n_classes)
    metrics["mean_per_class_recall"] = (per_class[counts > 0] / counts[counts > 0]).mean().item()
    return metrics


def _create_dataset(entry: dict[str, Any]):
    return get_plugin_manager().catalog.create("datasets", entry)


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, LinearProbe, params=LinearProbeParams)
