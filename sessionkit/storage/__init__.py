"""Storage backends: one per module, all following ``base.StorageAdapter``."""
