"""Datasheet peaks of common GPUs, to report achieved bandwidth and FLOP/s as a fraction of peak.

Dense (no sparsity) bf16 tensor-core TFLOP/s and HBM GB/s from the vendors' datasheets. Matched by
substring of ``torch.cuda.get_device_name()``; unknown devices report no fraction.
"""

from __future__ import annotations

# (name substring, peak dense bf16 TFLOP/s, peak memory GB/s); the first match wins, most specific first
_PEAKS = (
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100", 989.0, 3350.0),  # SXM
    ("H800", 989.0, 3350.0),
    ("GH200", 989.0, 4000.0),
    ("B200", 2250.0, 8000.0),
    ("A100-SXM4-40GB", 312.0, 1555.0),
    ("A100-PCIE-40GB", 312.0, 1555.0),
    ("A100", 312.0, 2039.0),  # 80 GB
    ("A800", 312.0, 2039.0),
    ("L40S", 362.0, 864.0),
    ("A10G", 70.0, 600.0),
    ("RTX 4090", 165.0, 1008.0),
)


def device_peaks(name: str | None) -> tuple[float | None, float | None]:
    """(peak bf16 TFLOP/s, peak GB/s) for a CUDA device name, or (None, None) when unknown / CPU."""
    if not name:
        return None, None
    for key, tflops, gbps in _PEAKS:
        if key in name:
            return tflops, gbps
    return None, None
