"""`oflsam2 weights list | download NAME | import FILE | path NAME`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("weights", help="list, download, import or locate model weights")
    p.set_defaults(func=lambda args: p.print_help() or 2)
