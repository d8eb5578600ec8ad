"""cirlab: a training framework for composed image retrieval and conditional image representations.

The subpackages live in the repository's top-level folders (models/, losses/, data/, train/)
and are mapped onto ``cirlab.<name>`` by pyproject.toml.
"""

__version__ = "0.1.0"
