import subprocess
import sys


def test_hub_cli_says_it_is_not_built_and_fails() -> None:
    proc = subprocess.run([sys.executable, "-m", "hub.cli"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not built yet" in proc.stderr
    assert proc.stdout == ""
