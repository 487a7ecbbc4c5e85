"""The CPU the suite runs on, in one line: its model and the vector instructions TensorFlow's
and TFLite's kernels choose their code paths by.

Machines of CI's kind come with different CPUs (a Xeon with AVX-512, an AMD EPYC with AVX2 and
FMA only) and nobody chooses which. Quantized kernels (XNNPACK, ruy) take other paths on each,
so a test log that does not say which CPU it ran on cannot be compared with another. The test
command prints this line first (``python -m tests.machine``) and pytest's header repeats it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: The instruction sets that change which kernels run, in the order they are printed.
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
         "avx512_bf16", "avx_vnni", "amx_tile")


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``cpu: <model>, <n> cores; <flags present> (no <those absent>)``; the platform's
    processor name where there is no ``/proc/cpuinfo`` (macOS)."""
    found: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())  # the first CPU's lines
    except OSError:
        pass
    model = found.get("model name") or platform.processor() or platform.machine()
    flags = set(found["flags"].split()) if "flags" in found else None
    text = f"cpu: {model}, {os.cpu_count()} cores"
    if flags is not None:
        present = [flag for flag in FLAGS if flag in flags]
        absent = [flag for flag in FLAGS if flag not in flags]
        text += f"; {' '.join(present) or 'none of ' + ' '.join(FLAGS)}"
        if absent:
            text += f" (no {' '.join(absent)})"
    return text


if __name__ == "__main__":
    print(describe())
