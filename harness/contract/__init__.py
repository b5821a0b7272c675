"""The bottom layer: the plugin contract and the value types every other layer speaks in."""
