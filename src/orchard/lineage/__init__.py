"""Lineage: where every checkpoint came from, and what reusing it saved."""

from .record import ancestry, checkpoint_name, new_record, parent_entry, total_flops

__all__ = ["ancestry", "checkpoint_name", "new_record", "parent_entry", "total_flops"]
