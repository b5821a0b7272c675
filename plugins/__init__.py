"""Built-in backend plugins and model presets, registered like any third-party plugin."""
