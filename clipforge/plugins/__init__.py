"""The built-in components, registered through the same hooks a third-party plugin uses."""

#: Loaded by the plugin manager before any entry-point plugin, in this order.
BUILTINS = (
    "clipforge.plugins.encoders.open_clip",
    "clipforge.plugins.losses.contrastive",
    "clipforge.plugins.datasets.synthetic_shapes",
    "clipforge.plugins.datasets.tables",
    "clipforge.plugins.curation.caption_length",
    "clipforge.plugins.evaluators.zero_shot",
    "clipforge.plugins.evaluators.retrieval",
)
