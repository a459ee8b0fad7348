"""Named strategy recipes; filled by the continual-learning issue."""
