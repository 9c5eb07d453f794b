"""The training loop over a :class:`TrainState`: batches in, optimizer steps, checkpoints, the exported model."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from clipforge.core.catalog import Catalog
from clipforge.core.checkpoint import open_clip_config, save_open_clip_dir
from clipforge.core.components import Adapter, EncoderBundle, Preparable
from clipforge.core.errors import StageError
from clipforge.core.recipe import Recipe, TrainConfig
from clipforge.core.results import Shard, SourceShards, TrainResult
from clipforge.core.storage import Store
from clipforge.engine.data import EpochPlan, MixturePlan, ShardBatches, unit_size
from clipforge.engine.training.adapting import ADAPTER_DIR, apply_adapter, save_adapter
from clipforge.engine.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from clipforge.engine.training.ema import WeightEma
from clipforge.engine.training.optim import create_optimizer, lr_at, set_lr
from clipforge.engine.training.runtime import Runtime, cores_for_loader
from clipforge.engine.training.state import TrainState
from clipforge.engine.training.step import forward_backward
from clipforge.engine.training.warm_start import (
    pinned_model_entry,
    starts_missing,
    warm_start,
    weight_average,
    without_weights,
)

#: Called on rank 0 after every optimizer step with its metrics (``loss``, ``lr``, ``samples_per_s``, ...).
StepCallback = Callable[[int, dict[str, float]], None]
#: Rank 0 writes where training is to ``<out>/progress.json`` at most this often (seconds), and after the last step.
PROGRESS_EVERY_S = 1.0
log = logging.getLogger(__name__)


def train(
    recipe: Recipe,
    catalog: Catalog,
    store: Store,
    out: str,
    shards: list[Shard],
    *,
    sources: list[SourceShards] | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the recipe's model on curated ``shards``; checkpoints and the final model go under ``out``.

    A recipe that draws by weight (a mixture or a budget: :meth:`~clipforge.Recipe.draws_by_weight`)
    draws from ``sources`` instead (default: ``shards`` as one source).

    Resumes from the latest complete checkpoint under ``out``; ``out/result.json`` marks the
    training complete. Under a multi-process launcher each process trains its slice of every
    global batch of ``batch_size * world_size`` pairs with DDP; rank 0 writes the checkpoints
    and the model, and calls ``on_step``.
    """
    if store.exists(f"{out}/result.json"):
        return TrainResult.model_validate(store.read_json(f"{out}/result.json"))
    runtime = Runtime.start(recipe.train)
    with cores_for_loader(runtime.device, recipe.train.workers, runtime.world):
        return Trainer.build(recipe, catalog, store, out, shards, runtime, sources).run(on_step, progress)


@dataclass(frozen=True)
class Plan:
    """How many optimizer steps each epoch takes (every rank the same number)."""

    per_epoch: list[int]

    @property
    def total(self) -> int:
        return sum(self.per_epoch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, steps already done in it) of the next step; past the end: (epochs, 0)."""
        done = 0
        for epoch, n in enumerate(self.per_epoch):
            if step < done + n:
                return epoch, step - done
            done += n
        return len(self.per_epoch), 0


def plan_steps(shards: list[Shard], cfg: TrainConfig, world: int) -> Plan:
    sizes = [s.samples for s in shards]
    epochs = [EpochPlan(sizes, seed=cfg.seed, epoch=e, batch_size=cfg.batch_size, world=world) for e in range(cfg.epochs or 1)]
    plan = Plan([e.batches // cfg.accum_steps for e in epochs])
    if plan.total == 0:
        raise StageError(
            f"train: {sum(sizes)} curated pairs give no full batch of train.batch_size={cfg.batch_size}"
            + (f" x {world} processes" if world > 1 else "")
            + (f" x train.accum_steps={cfg.accum_steps}" if cfg.accum_steps > 1 else "")
            + "; lower the batch size or add data"
        )
    return plan


def plan_budget(sources: list[SourceShards], cfg: TrainConfig, world: int) -> tuple[Plan, MixturePlan]:
    """The steps of a run drawn from weighted ``sources``: the budget (without one, ``epochs`` times the
    sources' pairs), and which samples of which source each micro-batch holds."""
    per_step = cfg.batch_size * world * cfg.accum_steps
    samples = (cfg.epochs or 1) * sum(_pairs(s) for s in sources) if cfg.budget is None else cfg.budget.samples
    steps = cfg.budget.steps if cfg.budget is not None and cfg.budget.steps is not None else (samples or 0) // per_step
    if steps == 0:
        raise StageError(
            f"train: a budget of {samples:,} samples is less than one global batch of {per_step} "
            f"(train.batch_size={cfg.batch_size} x {world} process(es) x train.accum_steps={cfg.accum_steps})"
        )
    unit = unit_size(cfg.batch_size)
    for source in sources:
        if source.weight > 0 and _pairs(source) < unit:
            raise StageError(
                f"train: the source {source.name!r} has {_pairs(source)} curated pair(s), fewer than the {unit} "
                "read together; give it weight 0 or more data"
            )
    mixture = MixturePlan(
        [[s.samples for s in source.shards] for source in sources], [s.weight for s in sources],
        [zlib.crc32(s.name.encode()) for s in sources], seed=cfg.seed, batch_size=cfg.batch_size, world=world,
        batches=steps * cfg.accum_steps,
    )  # fmt: skip
    return Plan([steps]), mixture


def _pairs(source: SourceShards) -> int:
    return sum(s.samples for s in source.shards)


@dataclass
class Trainer:
    """Everything one process trains with; :meth:`run` takes it from its :class:`TrainState` to the end."""

    recipe: Recipe
    store: Store
    out: str
    shards: list[Shard]
    runtime: Runtime
    bundle: EncoderBundle
    trained: torch.nn.Module  # the model as the step runs it (wrapped in DDP with several processes)
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    plan: Plan
    state: TrainState
    init_from: str | None
    initial: dict[str, torch.Tensor] | None  # the starting weights, kept for WiSE-FT
    resumed_from: str | None
    base_model: str | None = None  # a hub model the recipe's model entry names, pinned to its commit
    adapter: Adapter | None = None
    ema: WeightEma | None = None
    mixture: MixturePlan | None = None  # batches drawn from weighted sources (``shards``: all of theirs, in order)
    sources: list[SourceShards] | None = None
    clock: float = 0.0  # when the last step ended
    reported: float = 0.0  # when progress.json was last written

    @classmethod
    def build(
        cls, recipe: Recipe, catalog: Catalog, store: Store, out: str, shards: list[Shard], runtime: Runtime,
        sources: list[SourceShards] | None = None,
    ) -> Trainer:  # fmt: skip
        cfg, options = recipe.train, recipe.storage.options
        torch.manual_seed(cfg.seed)
        entry, base_model = pinned_model_entry(recipe.model.entry(), store, out, lead=runtime.lead)
        if cfg.if_missing == "scratch" and starts_missing(cfg, store, out, options):
            entry = without_weights(entry, options)
        bundle = catalog.create("encoders", entry)
        model = bundle.model.to(runtime.device)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        loss_fn = catalog.create("losses", recipe.loss.entry(), options).to(runtime.device)
        if isinstance(loss_fn, Preparable):
            loss_fn.prepare(bundle)
        mixture = None
        if recipe.draws_by_weight():
            sources = sources or [SourceShards(name="train", weight=1.0, shards=shards)]
            shards = [s for source in sources for s in source.shards]
            plan, mixture = plan_budget(sources, cfg, runtime.world)
        else:
            plan = plan_steps(shards, cfg, runtime.world)
        init_from, initial = warm_start(model, cfg, store, out, options, lead=runtime.lead)
        adapter = None
        if cfg.adapter is not None:
            if cfg.weight_average is not None and initial is None:  # WiSE-FT of the adapter: scale its merged update
                initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            adapter = catalog.create("adapters", cfg.adapter.entry())
            apply_adapter(adapter, model, cfg.adapter.unlock)
        optimizer = create_optimizer(model, cfg, runtime.device)
        ema = WeightEma(model, cfg.ema) if cfg.ema is not None else None
        resumed_from = latest_checkpoint(store, out)
        state = load_checkpoint(store, resumed_from, model, optimizer, runtime.scaler, ema) if resumed_from else TrainState()
        return cls(recipe, store, out, shards, runtime, bundle, runtime.parallel(model), loss_fn, optimizer, plan, state,
                   init_from, initial, resumed_from, base_model, adapter, ema, mixture, sources)  # fmt: skip

    @property
    def model(self) -> Any:  # the open_clip model itself (encode_image, logit_scale), never the DDP wrapper
        return self.bundle.model

    def run(self, on_step: StepCallback | None, progress: bool) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, state = self.recipe.train, self.state
        # disable=None: a bar on terminals only, never in the logs of workers and CI
        bar = tqdm(total=self.plan.total, initial=state.step, desc="train", unit="step",
                   disable=None if (progress and self.runtime.lead) else True)  # fmt: skip
        started = self.clock = time.perf_counter()
        self.model.train()
        self.loss_fn.train()
        first_epoch, skip = self.plan.position(state.step)
        stream = self._stream(first_epoch, skip)
        for epoch in range(first_epoch, len(self.plan.per_epoch)):
            for _ in range(self.plan.per_epoch[epoch] - (skip if epoch == first_epoch else 0)):
                metrics = self._step(self._micro_batches(stream, epoch), epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if self.runtime.lead:
                    self._report(metrics)
                    if on_step:
                        on_step(state.step, metrics)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < self.plan.total:
                    self._checkpoint()
        bar.close()
        return self._finish(time.perf_counter() - started)

    def _report(self, metrics: dict[str, float]) -> None:
        """``progress.json``: the step, the total, the loss, the pace and the device, for whoever follows the
        training from outside its processes (the train flow shows it in Prefect). Written atomically."""
        now, step = time.monotonic(), self.state.step
        if now - self.reported < PROGRESS_EVERY_S and step < self.plan.total:
            return
        self.reported = now
        report = {
            "step": step, "total": self.plan.total, "epoch": int(metrics["epoch"]), "epochs": len(self.plan.per_epoch),
            "loss": metrics["loss"], "samples_per_s": metrics["samples_per_s"], "device": str(self.runtime.device),
            "world_size": self.runtime.world,
        }  # fmt: skip
        try:
            self.store.write_json(f"{self.out}/progress.json", report)
        except Exception as e:  # a report must not stop the training it reports on; the store retried already
            log.warning("train: cannot write %s (%s); training goes on", self.store.uri(f"{self.out}/progress.json"), e)

    def _stream(self, first_epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every micro-batch still to train, from one loader (its workers start once)."""
        cfg, device, accum = self.recipe.train, self.runtime.device, self.recipe.train.accum_steps
        schedule = [
            (epoch, batch)
            for epoch in range(first_epoch, len(self.plan.per_epoch))
            for batch in range((skip if epoch == first_epoch else 0) * accum, self.plan.per_epoch[epoch] * accum)
        ]
        batches = ShardBatches(
            self.store, self.shards, self.bundle.preprocess_train, self.bundle.tokenizer,
            seed=cfg.seed, batch_size=cfg.batch_size, schedule=schedule, rank=self.runtime.rank, world=self.runtime.world,
            mixture=self.mixture,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
            # spawned, not forked: a fork would inherit the threads of Prefect and MLflow clients, and a
            # forkserver's workers outlive a training process that is killed
            multiprocessing_context="spawn" if cfg.workers else None,
            # its own generator: iterating must not draw from the global one, which a resume restored
            generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip
        return iter(loader)

    def _micro_batches(
        self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]], epoch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches, on the device."""
        device, micro = self.runtime.device, []
        for _ in range(self.recipe.train.accum_steps):
            try:
                images, tokens = next(stream)
            except StopIteration:
                raise StageError(f"train: the data of epoch {epoch + 1} ended early; the shards changed under the run?") from None
            micro.append((images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)))
        return micro

    def _step(self, micro: list[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> dict[str, float]:
        """One optimizer step over the accumulated micro-batches; returns its metrics."""
        cfg, state, runtime = self.recipe.train, self.state, self.runtime
        lr = lr_at(cfg, state.step, self.plan.total)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        losses = forward_backward(self.trained, self.loss_fn, micro, runtime.autocast, runtime.backward)
        if not torch.isfinite(losses["loss"]):
            last = latest_checkpoint(self.store, self.out)
            raise StageError(
                f"train: the loss is {losses['loss'].item()} at step {state.step + 1}; stopped"
                + (f" (the last good checkpoint is {self.store.uri(last)})" if last else " before any checkpoint")
            )
        runtime.optimizer_step(self.optimizer, self.model, cfg.grad_clip)
        with torch.no_grad():  # as open_clip: the temperature never exceeds 100
            self.model.logit_scale.clamp_(0, math.log(100))
        n = cfg.batch_size * runtime.world * cfg.accum_steps
        state.step, state.epoch, state.samples = state.step + 1, epoch, state.samples + n
        if self.ema is not None:
            self.ema.after_step(state.step)
        metrics = {
            "loss": losses["loss"].item(),
            **{k: v.item() for k, v in losses.items() if k != "loss"},
            "lr": lr,
            "logit_scale": self.model.logit_scale.exp().item(),
            "samples_per_s": n / max(time.perf_counter() - self.clock, 1e-9),  # loading the batch included
            "epoch": epoch + 1,
        }
        if runtime.world > 1:  # each rank's own pace: a slow one holds every step back
            metrics["world_size"] = float(runtime.world)
            per_rank = n // runtime.world
            for rank, seconds in enumerate(runtime.gather(time.perf_counter() - self.clock)):
                metrics[f"samples_per_s_rank{rank}"] = per_rank / max(seconds, 1e-9)
        state.history.append({"step": state.step, **metrics})
        self.clock = time.perf_counter()
        return metrics

    def _checkpoint(self) -> str | None:
        """Rank 0 writes a checkpoint of the state; every rank waits for it."""
        rel = None
        if self.runtime.lead:
            rel = save_checkpoint(self.store, self.out, self.state, self.model, self.optimizer, self.runtime.scaler,
                                  open_clip_config(self.bundle), trainable_only=self.adapter is not None,
                                  ema=self.ema)  # fmt: skip
        self.runtime.barrier()
        return rel

    def _finish(self, seconds: float) -> TrainResult:
        """The final checkpoint, WiSE-FT, the exported model and ``result.json`` (rank 0; the others read it)."""
        if not self.runtime.lead:
            self.runtime.barrier()  # rank 0 writes the final checkpoint and the model
            return TrainResult.model_validate(self.store.read_json(f"{self.out}/result.json"))
        cfg, state, store = self.recipe.train, self.state, self.store
        state.epoch = len(self.plan.per_epoch) - 1
        final = save_checkpoint(
            store, self.out, state, self.model, self.optimizer, self.runtime.scaler, open_clip_config(self.bundle),
            trainable_only=self.adapter is not None, ema=self.ema,
        )  # fmt: skip
        self.model.eval()
        if self.ema is not None:  # the average is what is exported; the raw weights stay in the checkpoint
            self.ema.copy_to(self.model)
        adapter_uri = None
        if self.adapter is not None:
            adapter_uri = save_adapter(self.adapter, self.model, store, f"{self.out}/{ADAPTER_DIR}",
                                       base=self.base_model or self.init_from)  # fmt: skip
            self.adapter.merge(self.model)
        if self.initial is not None and cfg.weight_average is not None:
            weight_average(self.model, self.initial, cfg.weight_average.alpha)
        with tempfile.TemporaryDirectory() as tmp:
            self.bundle.model = self.model.cpu()
            save_open_clip_dir(self.bundle, tmp, extra={"recipe": self.recipe.name, "steps": state.step})
            model_uri = store.put_dir(tmp, f"{self.out}/model")
        result = TrainResult(
            steps=state.step, epochs=len(self.plan.per_epoch), pairs=sum(s.samples for s in self.shards),
            final_loss=state.history[-1]["loss"] if state.history else None,
            samples_per_s=round(state.samples / seconds, 1) if state.samples else None, seconds=round(seconds, 2),
            resumed_from=self.resumed_from, init_from=self.init_from,
            weight_average_alpha=cfg.weight_average.alpha if cfg.weight_average else None, world_size=self.runtime.world,
            checkpoint=final, model=f"{self.out}/model", model_uri=model_uri, device=str(self.runtime.device),
            precision=self.runtime.precision, base_model=self.base_model,
            adapter=f"{self.out}/{ADAPTER_DIR}" if adapter_uri else None, adapter_uri=adapter_uri,
            ema_decay=cfg.ema.decay if cfg.ema else None,
            seen=dict(zip((s.name for s in self.sources or []), self.mixture.seen(), strict=True)) if self.mixture else {},
        )  # fmt: skip
        store.write_bytes(f"{self.out}/history.json", json.dumps(state.history).encode())
        store.write_json(f"{self.out}/result.json", result.model_dump(mode="json"))
        self.runtime.barrier()
        return result
