"""Loss parity between backends that ran the same recipe (filled in by the backends issue)."""


def annotate_parity(record: dict, earlier: list[dict]) -> None:
    record.setdefault("parity", None)
