"""promptswap: one frozen vision-language backbone, many hot-swappable prompt adapters."""

__version__ = "0.1.0"
