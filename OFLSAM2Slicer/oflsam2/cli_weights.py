"""`oflsam2 weights list | download NAME | import FILE | path NAME`.

Thin wrappers around :mod:`oflsam2.weights`; errors are raised as WeightsError and
reported by ``cli.main`` as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys

from .errors import InputError


def _list(args: argparse.Namespace) -> int:
    from . import weights

    rows = weights.list_models()
    header = ("NAME", "FAMILY", "SIZE", "STATUS", "PATH")
    table = [header] + [
        (r["name"], r["family"], r["size_text"], r["status"], r["path"] or "-") for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
            + "  "
            + row[-1]
        )
    print(f"\ncache: {weights.cache_dir()} (set OFLSAM2_HOME to move it)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from . import weights

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InputError(f"--timeout must be a number of seconds above 0, not {args.timeout}")
    entry = weights.get_entry(args.name)
    if not args.force and weights.status(args.name) in ("cached", "bundled"):
        print(weights.resolve(args.name))
        print(
            f"{args.name} is already there and verified (use --force to download again)",
            file=sys.stderr,
        )
        return 0
    bar = _DownloadProgress(args.name, entry.size)
    try:
        path = weights.download(args.name, progress=bar, timeout=args.timeout)
    finally:
        bar.close()
    print(path)
    return 0


class _DownloadProgress:
    """Bytes received: a tqdm bar on a terminal, a few lines in a log (see cli_progress)."""

    def __init__(self, name: str, size: int | None) -> None:
        from .cli_progress import ProgressLines, is_terminal

        self.name, self.size = name, size
        self.bar = None
        self.finished = False
        self.lines = None if is_terminal(sys.stderr) else ProgressLines(sys.stderr, unit="MiB")

    def __call__(self, done: int, total: int | None) -> None:
        if self.finished:
            return
        total = total or self.size
        if self.lines is not None:
            mib = 2**20
            self.lines.update(f"download {self.name}", done // mib, (total or 0) // mib)
        else:
            self._bar(done, total)
        if total is not None and done >= total:
            self.close()  # transfer complete; verification follows
            print(f"verifying {self.name} ...", file=sys.stderr)
            self.finished = True

    def _bar(self, done: int, total: int | None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total,
                initial=done,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.name,
                file=sys.stderr,
                leave=True,
            )
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _import(args: argparse.Namespace) -> int:
    from . import weights

    path = weights.import_file(args.file, name=args.name)
    print(path)
    return 0


def _path(args: argparse.Namespace) -> int:
    from . import weights

    print(weights.resolve(args.name))
    return 0


def register(sub) -> None:
    """Add the ``weights`` command to the top-level sub-parsers."""
    p = sub.add_parser(
        "weights",
        help="list, download, import or locate model weights",
        description=(
            "Model weights live in a per-user cache ($OFLSAM2_HOME, default ~/.cache/oflsam2) "
            "and are verified before use."
        ),
    )

    def show_help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=show_help)
    actions = p.add_subparsers(dest="weights_action", metavar="ACTION")

    lp = actions.add_parser("list", help="show every known model, its size, status and path")
    lp.set_defaults(func=_list)

    dp = actions.add_parser("download", help="download a model into the cache and verify it")
    dp.add_argument("name", metavar="NAME", help="model name, as shown by `oflsam2 weights list`")
    dp.add_argument(
        "--force", action="store_true", help="download again even if a verified copy is cached"
    )
    dp.add_argument(
        "--timeout", type=float, default=60, help="seconds without data before giving up"
    )
    dp.set_defaults(func=_download)

    ip = actions.add_parser(
        "import", help="copy a checkpoint downloaded by hand into the cache, after verifying it"
    )
    ip.add_argument("file", metavar="FILE", help="the checkpoint file (.pt)")
    ip.add_argument(
        "--name", metavar="NAME", help="model name (default: recognised from hash or file name)"
    )
    ip.set_defaults(func=_import)

    pp = actions.add_parser("path", help="print the path of a verified checkpoint")
    pp.add_argument("name", metavar="NAME", help="model name")
    pp.set_defaults(func=_path)
