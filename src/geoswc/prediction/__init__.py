"""Prediction: Search-within-Cell (cell choice, DBSCAN, spherical mean, prediction density), calibration, the
result types and output formats, and :class:`~geoswc.prediction.geolocator.Geolocator`, the one path from
photos to estimates.
"""
