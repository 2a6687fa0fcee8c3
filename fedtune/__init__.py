"""fedtune: federated, differentially private fine-tuning of language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedtune")  # pyproject.toml's [project] version
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
