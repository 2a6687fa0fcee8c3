"""GLUE data loading, partitioning, tokenization and metrics."""
