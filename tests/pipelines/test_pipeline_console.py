"""A quiet job's console: the raylet's messages, which Ray's driver prints straight to
stdout, go to the log file; every other line reaches the console unchanged and in order."""

from __future__ import annotations

import logging

from pipelines import console


def test_raylet_lines_go_to_the_log_and_the_rest_passes(capsys, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="peftpipe.ray")
    with console.raylet_lines_to_log():
        print("[     6s] 563e8_00000 lora             started")
        print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started")
        print("step", end="")
        print(" 50/150")
    print("after")
    assert capsys.readouterr().out.splitlines() == [
        "[     6s] 563e8_00000 lora             started", "step 50/150", "after"]
    assert [r.getMessage() for r in caplog.records] == [
        "(raylet) WARNING: 8 PYTHON worker processes have been started"]
