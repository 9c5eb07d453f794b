"""The kinds of component a plugin can register: one table, read by the catalog, the plugin manager,
recipe validation, error messages, ``clipforge plugins`` and the conformance kit."""

from __future__ import annotations

from dataclasses import dataclass

from clipforge.core import components as c


@dataclass(frozen=True)
class Kind:
    """One kind of component.

    ``hook`` is the registration hook (in :mod:`clipforge.core.hookspecs`); ``protocols`` what its
    factories return (one of them); ``capabilities`` the optional protocols a component may also
    implement; ``check`` the conformance check of :mod:`clipforge.testing` that holds a component
    to them; ``recipe_fields`` where recipes reference components of the kind (``*``: every item of
    a list or value of a mapping); ``host_fields`` the fields of such an entry that the host reads
    itself instead of passing them to the factory.
    """

    name: str
    noun: str
    hook: str
    protocols: tuple[type, ...]
    capabilities: tuple[type, ...]
    check: str
    recipe_fields: tuple[str, ...]
    host_fields: tuple[str, ...] = ()


#: Every kind, in the order ``clipforge plugins`` lists them; iterating gives the kind names.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("encoders", "encoder", "register_encoders", (c.EncoderBundle,), (), "check_encoder", ("model",)),
        Kind("losses", "loss", "register_losses", (c.ContrastiveLoss,), (c.NeedsInputs, c.Preparable), "check_loss", ("loss",)),
        Kind(
            "datasets",
            "dataset",
            "register_datasets",
            (c.Dataset,),
            (
                c.ClassificationDataset,
                c.TemplatedDataset,
                c.PartitionedDataset,
                c.MultilabelDataset,
                c.SkipsSamples,
                c.DigestsContent,
            ),
            "check_dataset",
            ("data.train", "data.train.*.source", "data.eval", "data.eval.*", "evaluation.*.dataset"),
        ),
        Kind(
            "evaluators",
            "evaluator",
            "register_evaluators",
            (c.Evaluator,),
            (c.ReportsDetails, c.ChoosesHyperparameters, c.NeedsClasses, c.ReportsPerSample),
            "check_evaluator",
            ("evaluation.*",),
            host_fields=("dataset", "name", "sets"),
        ),
        Kind(
            "curation_steps",
            "curation step",
            "register_curation_steps",
            (c.CurationStep, c.WholeDatasetStep),
            (c.DeclaresPixels, c.DecidesAgainstPool, c.DecidesInPartitions),
            "check_curation_step",
            ("curation.*",),
        ),
        Kind("launchers", "launcher", "register_launchers", (c.Launcher,), (), "check_launcher", ("train.launcher",)),
        Kind("adapters", "adapter", "register_adapters", (c.Adapter,), (), "check_adapter", ("train.adapter",), ("unlock",)),
    )
}


def noun(kind: str) -> str:
    """``"curation step"`` for ``"curation_steps"``; an unknown kind as it is."""
    return KINDS[kind].noun if kind in KINDS else kind
