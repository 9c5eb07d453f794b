"""Built-in curation."""
