"""``python -m torchx_ext COMMAND``: torchx-ext's own commands, for what TorchX's CLI lacks.

Commands: ``prune`` (see :mod:`torchx_ext.prune`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {"prune": "removes ended apps older than a cutoff (python -m torchx_ext prune --help)"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m torchx_ext COMMAND [ARGS]\n\ncommands:\n"
              + "".join(f"  {name:8} {what}\n" for name, what in COMMANDS.items()))
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from torchx_ext import prune

    return prune.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
