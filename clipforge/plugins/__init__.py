"""The built-in components, registered through the same hooks a third-party plugin uses."""

#: Loaded by the plugin manager before any entry-point plugin, in this order.
BUILTINS = (
    "clipforge.plugins.encoders.open_clip",
    "clipforge.plugins.losses.contrastive",
    "clipforge.plugins.datasets.synthetic_shapes",
    "clipforge.plugins.datasets.webdataset",
    "clipforge.plugins.datasets.tables",
    "clipforge.plugins.datasets.huggingface",
    "clipforge.plugins.datasets.digits",
    "clipforge.plugins.datasets.clip_benchmark",
    "clipforge.plugins.curation.caption_length",
    "clipforge.plugins.curation.image_size",
    "clipforge.plugins.curation.duplicates",
    "clipforge.plugins.curation.clip_score",
    "clipforge.plugins.curation.balance",
    "clipforge.plugins.evaluators.zero_shot",
    "clipforge.plugins.evaluators.retrieval",
    "clipforge.plugins.evaluators.linear_probe",
    "clipforge.plugins.evaluators.geometry",
    "clipforge.plugins.evaluators.compositionality",
    "clipforge.plugins.evaluators.caption_selection",
    "clipforge.plugins.evaluators.digits",
    "clipforge.plugins.launchers.local",
    "clipforge.plugins.launchers.torchrun",
    "clipforge.plugins.launchers.ray",
    "clipforge.plugins.adapters.lora",
)
