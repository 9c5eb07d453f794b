"""Built-in launchers: how the train stage runs."""
