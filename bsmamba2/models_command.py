"""`bsmamba2 models`: list the known models, download some into the cache, or show everything about one.

    bsmamba2 models                           # name, stems, size, cached?, reported scores, description
    bsmamba2 models download NAME [NAME ...]  # verified by sha256; resumes an interrupted download
    bsmamba2 models info NAME
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from . import hub
from .sizes import megabytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Without ACTION: the table of models (or --json), and where the cache is."
    parser.add_argument("--json", action="store_true", help="print the models as JSON instead of a table")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    download = actions.add_parser("download", help="fetch models into the cache (checked against their sha256)",
                                  description="Fetch models into the cache, checked against their sha256.")
    download.add_argument("names", nargs="+", metavar="NAME")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    info = actions.add_parser("info", help="every field of one model, its file and the cache folder",
                              description="Every field of one model, its file and the cache folder.")
    info.add_argument("name", metavar="NAME")


def run(args: argparse.Namespace) -> int:
    if args.action == "download":
        entries = [hub.get_model(name) for name in args.names]  # every name checked before the first download
        for entry in entries:
            path, _ = hub.checkpoint_file(entry.name, progress=not args.quiet)
            print(f"{entry.name}: {path}")
        return 0
    if args.action == "info":
        print(_details(hub.get_model(args.name)))
        return 0
    entries = list(hub.registry().values())
    if args.json:
        print(json.dumps([_as_dict(entry) for entry in entries], indent=2))
    else:
        print(_table(entries))
        print(f"\ncache: {hub.cache_dir()}    your own models: a YAML file named by {hub.MODELS_ENV}")
    return 0


def _table(entries: list[hub.ModelEntry]) -> str:
    rows = [("NAME", "STEMS", "SIZE", "CACHED", "SCORES", "DESCRIPTION")]
    rows += [(entry.name, ",".join(entry.stems) or "?", _size(entry), _where(entry), _scores(entry),
              entry.description) for entry in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip()
                     for row in rows)


def _details(entry: hub.ModelEntry) -> str:
    fields = _as_dict(entry)
    scores = fields.pop("scores")
    lines = [f"{key}: {', '.join(value) if isinstance(value, list) else value}" for key, value in fields.items()
             if value not in (None, "", [])]
    lines += [f"score: {s['stem']} {s['metric']} {s['value']} dB on {s['dataset']} ({s['source']})" for s in scores]
    return "\n".join(lines)


def _as_dict(entry: hub.ModelEntry) -> dict:
    fields = dataclasses.asdict(entry)
    fields.update(stems=list(entry.stems), path=str(hub.local_path(entry)), cached=hub.is_cached(entry))
    return fields


def _size(entry: hub.ModelEntry) -> str:
    path = hub.local_path(entry)
    size = entry.size if entry.size is not None else (path.stat().st_size if path.is_file() else None)
    return "?" if size is None else megabytes(size)


def _where(entry: hub.ModelEntry) -> str:
    """`bundled` (installed with the package), `local` (a file:// entry), else whether it is in the cache."""
    if entry.package_file is not None:
        return "bundled"
    present = "yes" if hub.is_cached(entry) else "no"
    return f"local ({'found' if present == 'yes' else 'missing'})" if entry.url.startswith("file:") else present


def _scores(entry: hub.ModelEntry) -> str:
    return "; ".join(f"{s.stem} {s.metric} {s.value:g} dB ({s.dataset})" for s in entry.scores) or "-"
