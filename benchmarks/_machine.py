"""The CPU model name, for the machine line every benchmark prints beside its results."""

import platform
import subprocess


def cpu_model() -> str:
    """`lscpu`'s model name, else platform.processor(), else "unknown CPU"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"
