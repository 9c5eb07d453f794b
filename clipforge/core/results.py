"""What each stage hands to the next: typed results, saved in the run's ``run.json`` for resumes
and given to the ``after_stage`` hook (which stage hands on which: :data:`clipforge.core.stages.STAGES`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from clipforge.core.recipe import REPLAY_SOURCE


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Shard(_Result):
    """A curated tar shard on the store: its path under the store's root, its samples, its sha256."""

    path: str
    samples: int
    sha256: str


class StepCounts(_Result):
    """What one curation step saw, kept and dropped, with the count of each drop reason."""

    seen: int = 0
    kept: int = 0
    dropped: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)


class ReplayResult(_Result):
    """The replayed share of a run's training data: a seeded sample of what an earlier model was trained on."""

    source: str = Field(description="where the replayed pairs come from: the champion's version and its data, or a manifest")
    pool: int = Field(description="the pairs the sample was drawn from")
    pairs: int = Field(description="the pairs replayed")
    fraction: float = Field(description="the replayed share of the training pairs (below the recipe's when the pool is small)")
    shards: list[Shard]
    uri: str = Field(description="replay.json: the result and the URIs of its shards, the next replay's pool")
    content_hash: str


class SourceShards(_Result):
    """One source of a weighted training mixture: its name and weight, and its curated data."""

    name: str
    weight: float
    shards: list[Shard]
    input: int = Field(0, description="its input pairs")
    kept: int = Field(0, description="its curated pairs")
    manifest_uri: str = Field("", description="its own curation's manifest (empty for the replayed data)")
    content_hash: str = ""
    reused: bool = Field(False, description="an unchanged source's earlier curation was reused")


class CurateResult(_Result):
    """The curated data: shards and a manifest (one row per input key) under ``out``."""

    out: str
    input: int
    kept: int
    parts: int
    funnel: dict[str, StepCounts]
    shards: list[Shard]
    manifest: str
    manifest_uri: str
    content_hash: str = Field(description="sha256 over every verdict and shard: the data's identity in lineage tags")
    seconds: float
    pairs_per_s: float | None = None
    reused: bool = Field(False, description="an identical earlier curation was reused")
    pool: str | None = Field(None, description="the manifest URI of the curated pool this curation was decided against")
    replay: ReplayResult | None = Field(None, description="earlier training data mixed in (data.replay)")
    sources: list[SourceShards] = Field(
        default_factory=list, description="a weighted mixture's sources, each curated on its own (empty: one dataset)"
    )

    def training_shards(self) -> list[Shard]:
        """What the model trains on: the curated shards and the replayed ones."""
        return self.shards + (self.replay.shards if self.replay else [])

    def training_sources(self, replay_fraction: float | None = None) -> list[SourceShards]:
        """What the model draws from by weight: each source (the one dataset is ``train``, weight 1) and
        the replayed data as one more source, weighted to be ``replay_fraction`` of the samples drawn."""
        sources = self.sources or [SourceShards(name="train", weight=1.0, shards=self.shards, input=self.input, kept=self.kept,
                                                manifest_uri=self.manifest_uri, content_hash=self.content_hash)]  # fmt: skip
        if self.replay and replay_fraction:
            weight = replay_fraction / (1 - replay_fraction) * sum(s.weight for s in sources)
            replayed = SourceShards(name=REPLAY_SOURCE, weight=weight, shards=self.replay.shards, input=self.replay.pairs,
                                    kept=self.replay.pairs, content_hash=self.replay.content_hash)  # fmt: skip
            sources = [*sources, replayed]
        return sources


class TrainResult(_Result):
    """The trained model (an open_clip folder under ``model``) and how it was trained."""

    steps: int
    epochs: int
    pairs: int
    final_loss: float | None
    samples_per_s: float | None
    seconds: float
    resumed_from: str | None = None
    init_from: str | None = Field(None, description="the warm start, pinned (an alias as the version it pointed at)")
    weight_average_alpha: float | None = None
    world_size: int = 1
    checkpoint: str
    model: str
    model_uri: str
    device: str
    precision: str
    reused: bool = Field(False, description="an identical earlier training was reused")
    base_model: str | None = Field(None, description="the hub model the recipe's model names, pinned to its commit")
    adapter: str | None = Field(None, description="the trained adapter alone, in its own format (merged into model)")
    adapter_uri: str | None = None
    ema_decay: float | None = Field(None, description="the exported weights are this EMA of the trained ones")
    seen: dict[str, int] = Field(
        default_factory=dict, description="drawn by weight (a mixture or a budget): the samples each source gave the training"
    )
    key: str = Field("", description="what the training depends on (data, model, loss, settings)")


class EvaluateResult(_Result):
    """Metrics ``eval/<evaluator>/<metric>`` (``eval/<set>/<evaluator>/<metric>`` with named sets)."""

    metrics: dict[str, float]
    metrics_uri: str
    data_hash: str = Field("", description="sha256 of the evaluators' settings and data: metrics with another are not comparable")
    params: dict[str, float] = Field(
        default_factory=dict, description="settings evaluators chose (a linear probe's weight_decay)"
    )
    per_sample_uri: str = Field("", description="the per-sample results of the metrics that have them (per_sample.json)")


class RegisterResult(_Result):
    """The registered version and the promotion decision."""

    model_name: str
    version: str
    promoted: bool
    previous_champion: str | None
    model_uri: str
    metric: str | None
    value: float | None
    reason: str
    interval: dict[str, float] | None = Field(
        None, description="with registry.promote.confidence: the paired-bootstrap interval of the metric's delta"
    )
    champion_report: dict[str, int] = Field(default_factory=dict, description="wins per side over every metric")
