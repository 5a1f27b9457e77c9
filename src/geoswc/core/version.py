"""The package version (one place: the package, the CLI's --version and the service read it)."""

__version__ = "0.1.0"
