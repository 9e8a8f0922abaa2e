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


def test_os_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["toy", "data", str(blocker / "sub"), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err and "Traceback" not in err


def test_lora_strength_typo_is_named(tmp_path, capsys):
    from dev2pro.errors import UserError
    from dev2pro.lora.apply import apply_loras

    f = tmp_path / "style.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UserError, match=r"must be a number: .*style.safetensors:0.8"):
        apply_loras(object(), [(f"{f}:abc", 1.0)])


@pytest.mark.parametrize("flags, message", [
    (["--caption-noise", "1.5"], "--caption-noise 1.5: must be in [0, 1)"),
    (["--caption-dropout", "-0.1"], "--caption-dropout -0.1: must be in [0, 1)"),
    (["--distill-lr", "0"], "--distill-lr 0.0: must be positive"),
    (["--w-min", "6"], "distill.w_min (6.0) must be >= 0 and <= distill.w_max (5.0)"),
])
def test_toy_build_refuses_bad_settings_before_any_stage(tmp_path, capsys, flags, message):
    work = tmp_path / "work"
    assert cli.main(["toy", "build", "--work", str(work), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not work.exists()  # nothing was built
