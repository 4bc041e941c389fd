"""`python -m yoyo_tenants --version`: the installed package's version. The commands are invoke
tasks (`invoke --list`)."""

from __future__ import annotations

import argparse

from . import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m yoyo_tenants",
        description="Schema-per-tenant PostgreSQL migrations. The commands are invoke tasks: "
        "run `invoke --list` in a project whose tasks.py has `from yoyo_tenants.tasks import ns`.",
    )
    parser.add_argument("--version", action="version", version=f"yoyo-tenants {__version__}")
    parser.parse_args(argv)
    parser.print_help()


if __name__ == "__main__":
    main()
