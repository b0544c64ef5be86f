"""qtrain: fine-tune a small code model within a memory budget, and measure what you got."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qtrain")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
