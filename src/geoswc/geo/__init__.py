"""The Earth's partition and names: adaptive S2 cells (:mod:`~geoswc.geo.cells`) and the nearest GeoNames place
(:mod:`~geoswc.geo.places`).
"""
