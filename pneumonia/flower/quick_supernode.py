"""`flower-supernode` with a shorter heartbeat, for the test federations: Flower notices a
dead SuperNode after two missed heartbeats, 2 x 30 s by default, and flwr 1.41 fixes the 30 s
in module constants (no option). Every test that kills a node waits that out, so the tests'
SuperNodes beat every `--heartbeat-s` seconds instead (the SuperLink accepts 10 to 1800).

    python -m pneumonia.flower.quick_supernode --heartbeat-s 10 [flower-supernode arguments]
"""

from __future__ import annotations

import sys

# The module constant both flwr modules read, each through its own binding of it.
_INTERVAL = "HEARTBEAT_DEFAULT_INTERVAL"


def main(argv: list[str]) -> int:
    # The SuperLink refuses a heartbeat outside 10-1800 s, and says so less plainly.
    if (
        len(argv) < 2
        or argv[0] != "--heartbeat-s"
        or not argv[1].isdigit()
        or not 10 <= int(argv[1]) <= 1800
    ):
        print(
            "usage: quick_supernode --heartbeat-s SECONDS (10 to 1800) "
            "[flower-supernode arguments]",
            file=sys.stderr,
        )
        return 2
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection

    # The sender paces its beats by the first; the connection declares the second to the
    # SuperLink, which declares the node dead after HEARTBEAT_PATIENCE of them.
    modules = (sender, connection)
    for module in modules:
        if not hasattr(module, _INTERVAL):
            message = f"{module.__name__} has no {_INTERVAL} (made for flwr 1.41)"
            print(f"error: {message}: start flower-supernode instead", file=sys.stderr)
            return 2
    for module in modules:
        setattr(module, _INTERVAL, float(argv[1]))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[2:]]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
