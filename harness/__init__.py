"""The core of ftbench (internal: plugins import from ``ftbench`` only).

Its folders are layers, bottom first; a module imports only from its own
layer or a lower one (docs/architecture.md, held by tests/test_layers.py):

- ``contract/``: the plugin contract (hookspecs, api, engine, memory_model,
  plugins, registry) and the value types every layer speaks in;
- ``cell/``: what runs inside one cell's process (data, model, training
  loop, measurement);
- ``grid/``: from settings and grid files to a checked list of cells;
- ``results/``: the write path of results (records, the store, parity);
- ``running/``: each cell in its own fresh process (group), the grid loop;
- ``analysis/``: reports, comparisons, history;
- ``cli``: the command line.
"""
