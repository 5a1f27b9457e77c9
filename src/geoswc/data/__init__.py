"""Photos and where they come from: safe decoding and GPS EXIF (:mod:`~geoswc.data.images`), preprocessing,
the published layouts of photo lists, CSV and folder records, WebDataset shards, and the sources dataclass.
"""
