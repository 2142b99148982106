"""`python -m pneumonia.flower.quick_supernode`: the test SuperNodes' shorter heartbeat (the
federation tests run it; here its own checks)."""

from __future__ import annotations

import sys

import flwr.supercore.heartbeat as sender
import flwr.supernode.fleet_http_connection as connection
import pytest

from pneumonia.flower import quick_supernode


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--heartbeat-s"],
        ["--beat", "10"],
        ["--heartbeat-s", "ten"],
        ["--heartbeat-s", "5"],  # the SuperLink takes 10 to 1800
        ["--heartbeat-s", "1801"],
    ],
)
def test_without_a_heartbeat_it_says_how_to_call_it(argv, capsys):
    assert quick_supernode.main(argv) == 2
    assert capsys.readouterr().err.startswith("usage: quick_supernode --heartbeat-s SECONDS")


def test_a_flower_without_the_constant_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.delattr(connection, "HEARTBEAT_DEFAULT_INTERVAL")
    before = sender.HEARTBEAT_DEFAULT_INTERVAL
    assert quick_supernode.main(["--heartbeat-s", "10", "--insecure"]) == 2
    assert before == sender.HEARTBEAT_DEFAULT_INTERVAL  # neither is set
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: flwr.supernode.fleet_http_connection has no HEARTBEAT_DEFAULT")
    assert len(err.splitlines()) == 1


def test_both_of_flowers_constants_are_set(monkeypatch):
    """The sender paces the beats, the connection declares them to the SuperLink."""
    monkeypatch.setattr(sender, "HEARTBEAT_DEFAULT_INTERVAL", sender.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(
        connection, "HEARTBEAT_DEFAULT_INTERVAL", connection.HEARTBEAT_DEFAULT_INTERVAL
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main hands Flower its arguments there
    called = []
    monkeypatch.setattr("flwr.supernode.cli.flower_supernode", lambda: called.append(sys.argv))
    assert quick_supernode.main(["--heartbeat-s", "10", "--insecure"]) == 0
    assert sender.HEARTBEAT_DEFAULT_INTERVAL == connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    assert called == [["flower-supernode", "--insecure"]]
