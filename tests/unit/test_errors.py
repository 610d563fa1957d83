"""User errors end in one line and exit 2; anything else is a bug and keeps its traceback."""

import pytest

from pipeline import cli
from pipeline.checkpoints import CheckpointError
from pipeline.config import ConfigError
from pipeline.data.storage import StorageError
from pipeline.errors import DataError, GapmError
from pipeline.eval.fid import FidError
from pipeline.eval.scoring import EvalError
from pipeline.tracking.registry import RegistryError


def test_every_user_facing_error_shares_one_base():
    for error in (ConfigError, DataError, StorageError, CheckpointError, RegistryError, FidError, EvalError):
        assert issubclass(error, GapmError), error
        assert not issubclass(error, ValueError), error  # a ValueError from a bug must not pass for one


def test_a_user_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["config", "--config", "configs/swissroll.yaml", "--set", "stage1.steps=fast"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "stage1.steps" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "command_show_config", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["config", "--config", "configs/swissroll.yaml"])
