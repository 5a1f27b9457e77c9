"""The gallery of geotagged embeddings: its within-cell search, FAISS codes, files on disk and thumbnails."""
