import subprocess
import sys

from kvpass.cli import main


def test_demo_help():
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "demo", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(f"--{o}" in r.stdout for o in ("method", "prefill", "decode", "new-tokens"))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_method_fails_before_loading(capsys):
    assert main(["demo", "--method", "nope"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["demo", "--method", "int8", "--bits", "2"]) == 1
    assert "no option 'bits'" in capsys.readouterr().err
    for bad in (["--prefill", "0"], ["--decode", "0"], ["--new-tokens", "0"]):
        assert main(["demo", *bad]) == 1
        assert "must be an integer >= 1" in capsys.readouterr().err
