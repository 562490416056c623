"""matryoshka-adaptor: make the embeddings of a frozen model truncatable."""

__version__ = "0.1.0"

from adaptor.search import exact_search, l2_normalize, truncate
