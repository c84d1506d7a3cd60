"""``crate-train`` / ``python -m crate_kernels.train``: every config field is a flag; see ``--help``."""

from __future__ import annotations

from crate_kernels.train.config import ConfigError, build_parser, parse_args
from crate_kernels.train.loop import train


def main(argv: list[str] | None = None) -> None:
    """Parse, train; a configuration that cannot work exits with status 2 and one clear line, before training."""
    try:
        train(parse_args(argv))
    except ConfigError as err:
        build_parser().exit(2, f"crate-train: error: {err}\n")


if __name__ == "__main__":
    main()
