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


PEAK_RSS_PRELUDE = r'''
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
'''
"""Source for a child benchmark script, after its imports: resets the kernel's peak RSS (Linux >= 4.0) and
defines `status(key)` (MiB of a /proc/self/status field) and `base` (the RSS now); the script later reports
`status("VmHWM") - base`, the peak growth of what it did since."""
