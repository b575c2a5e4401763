"""memslot: a live-updatable knowledge memory service built on product-key memory layers."""

__version__ = "0.1.0"
