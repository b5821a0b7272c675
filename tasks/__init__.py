"""Built-in task plugins, registered like any third-party plugin."""
