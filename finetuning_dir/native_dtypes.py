"""What this machine computes natively: the one place that decides whether bf16 is a fast dtype here.

It lives in the job's code folder because the fine-tune runs it on Azure ML compute as well as locally;
the local endpoint reads the same answer (finetune_phi.training.job_module) for its dtype policy.
"""

from __future__ import annotations

from pathlib import Path

# cpuinfo flags of the x86 units that multiply bf16 natively (AVX512-BF16 dot products, AMX tiles).
# Without them oneDNN converts every bf16 operand to fp32 first: slower than staying in fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports (/proc/cpuinfo), e.g. ["avx512_bf16", "amx_bf16"]."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:  # not Linux: no cpuinfo to read, so no claim of native bf16
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in CPU_BF16_FLAGS if f in flags]
    return []


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
