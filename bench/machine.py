"""What machine a benchmark row was measured on: every row records it, since a speed-up is a property of the
machine as much as of the code (bf16 on the CPU: 1.62-1.70x on an AMD EPYC without AMX, more with AMX)."""

import platform
from pathlib import Path


def cpu_model() -> str:
    """'AMD EPYC 9B14 (family 25 model 17, avx512_bf16, no amx)': the model name and what decides bf16's speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.split(":", 1)[0].strip() == key), "?")
    flags = field("flags").split()
    bf16 = "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16"
    amx = "amx" if "amx_bf16" in flags else "no amx"
    return f"{field('model name')} (family {field('cpu family')} model {field('model')}, {bf16}, {amx})"
