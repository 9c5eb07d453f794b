"""Built-in adapters: parameter-efficient training."""
