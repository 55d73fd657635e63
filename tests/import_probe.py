"""Runs one command (train, test, predict, export) as its script does, then reports on stderr
which heavy libraries the process had imported by its exit (for tests/test_flag_errors.py)."""
import atexit
import runpy
import sys

HEAVY = ("torch", "lightning", "torchvision", "matplotlib")


def _report() -> None:
    loaded = [name for name in HEAVY if name in sys.modules]
    print(f"IMPORTED: {','.join(loaded) or 'none'}", file=sys.stderr)


atexit.register(_report)
script = f"{sys.argv[1]}.py"
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
