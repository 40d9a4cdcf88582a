"""retrieval — the library every app of this project shares (indexer, trainer, service).

- :mod:`retrieval.encoders`: encoder specs (torch-free), backbones, heads, the label bridge, one factory.
- :mod:`retrieval.index`: the index folder: type choice, manifest, FAISS, reading, writing.
- :mod:`retrieval.datasets`: folder scanning, caption readers, splits, the DataLoader pieces.
- :mod:`retrieval.atomic`: the one durable atomic write/replace.
- :mod:`retrieval.metrics`, :mod:`retrieval.heads`, :mod:`retrieval.images`, :mod:`retrieval.errors`.

The library imports no app and no web framework; importing this package loads nothing heavy.
"""
