import importlib
import subprocess
import sys

import pytest

from dev2pro import cli


@pytest.mark.parametrize("name,module", cli.COMMANDS)
def test_every_subcommand_exists_and_documents_itself(name, module):
    mod = importlib.import_module(f"dev2pro.commands.{module}")
    assert mod.HELP and mod.DESCRIPTION and callable(mod.add_arguments) and callable(mod.main)


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, _ in cli.COMMANDS:
        assert name in out


def test_help_does_not_import_torch():
    code = "import sys; from dev2pro import cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
