"""The core of ftbench (internal: plugins import from ``ftbench`` only).

How a command becomes results (see docs/architecture.md):

- ``cli``: the command line;
- ``grid/``: from settings and grid files to a checked list of cells;
- ``running/``: each cell in its own fresh process (group), with the clock,
  limits and cleanup around it;
- ``cell/``: what happens inside that process (data, model, training loop,
  measurement);
- ``results/``: records, the result store, parity, reports and comparisons.

The plugin contract (``hookspecs``, ``api``, ``engine``, ``plugins``,
``registry``) sits at this level because every part uses it.
"""
