"""orchard: a language model's whole life on one shared base."""

__version__ = "0.1.0"
