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


def test_eval_passkey_bad_input_fails_before_loading(capsys):
    assert main(["eval"]) == 2 and "choose a task: ppl, passkey or generate" in capsys.readouterr().err
    for bad, says in ((["--method", "nope"], "unknown method 'nope'"), (["--depths", "1.5"], "[0, 1]"),
                      (["--lengths", "10"], ">= 64 tokens"), (["--samples", "0"], ">= 1")):
        assert main(["eval", "passkey", *bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kvpass eval: error:") and says in err and err.count("\n") == 1


def test_policy_and_calibrate_bad_input_fail_before_loading(capsys, tmp_path):
    for argv, says in (
            (["eval", "passkey", "--heads", "duo", "--retrieval", "1.5"], "(0, 1]"),
            (["eval", "passkey", "--heads", "streaming", "--method", "kivi"], "method must be 'fp16'"),
            (["eval", "passkey", "--sink", "4"], "applies to --heads duo or streaming"),
            (["eval", "passkey", "--heads", "duo", "--duo", str(tmp_path / "missing")], "missing"),
            (["eval", "passkey", "--chunk", "0"], "chunk must be >= 1"),
            (["calibrate", "duo", "--output", str(tmp_path / "g"), "--steps", "0"], "steps=0"),
            (["calibrate", "duo", "--output", str(tmp_path / "g"), "--lengths", "16"], "lengths=[16]")):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"kvpass {argv[0]}: error:") and says in err and err.count("\n") == 1, err
    assert main(["calibrate"]) == 2 and "choose a method: kvquant, qaq, cq, million or duo" in capsys.readouterr().err
