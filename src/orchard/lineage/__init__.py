"""Lineage: where every checkpoint came from, and what reusing it saved."""

from .record import ancestry, new_record, parent_entry, total_flops

__all__ = ["ancestry", "new_record", "parent_entry", "total_flops"]
