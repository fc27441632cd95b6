"""How the tests check that a command fails as a user error should: exit status 2, no traceback,
and one `orchard: error:` line, the last thing printed."""

from __future__ import annotations

from orchard.cli.main import main


def run_error(capsys, argv) -> str:
    """Run `orchard argv`, which must fail as a user error; returns its one error line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("orchard: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]
