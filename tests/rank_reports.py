"""Run ``ftbench run ARGS`` as the CLI does, and also keep every rank's report (``rank<R>.json``).

The driver turns rank reports into records and deletes them; the schema test
needs both. Run as a script, so that the cells' fork server belongs to this
process and not to pytest's::

    python tests/rank_reports.py REPORTS.json run --task generation --out OUT
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from click.testing import CliRunner

    import ftbench.harness.running.driver as driver
    from ftbench.harness.cli import main

    reports = []
    real = driver.run_cell_process

    def keep(spec, *args, **kwargs):
        outcome = real(spec, *args, **kwargs)
        reports.extend(outcome.ranks)
        return outcome

    driver.run_cell_process = keep
    result = CliRunner().invoke(main, sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump(reports, f)
    print(result.output)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    sys.exit(result.exit_code)
