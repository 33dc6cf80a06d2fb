"""sketch2real: teach Stable Diffusion a drawing style on Sketchy, and measure it."""

__version__ = "0.1.0"

import logging as _logging


class _ForeignNoise(_logging.Filter):
    """bitsandbytes >= 0.50 warns at every import of diffusers, on CPUs with AVX512-BF16, that its optional CPU 4-bit
    kernel package (`kernels`) is missing; nothing here runs 4-bit on the CPU, and a user can do nothing about it."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_ForeignNoise())
