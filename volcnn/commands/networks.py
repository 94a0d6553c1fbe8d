"""``volcnn networks``: list the registered network names (the values of ``network_def``)."""

from __future__ import annotations

import argparse

NAME = "networks"
HELP = "list the registered network names (for network_def)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    from volcnn.networks import list_networks

    print("\n".join(list_networks()))
    return 0
