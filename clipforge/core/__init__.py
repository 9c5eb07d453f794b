"""The small kernel: hookspecs, the plugin manager, recipes, storage, component protocols.

Imports nothing from the rest of clipforge.
"""
