"""Data: read and clean a corpus (corpus.py), tokenize, FIM and pack it (pack.py)."""
