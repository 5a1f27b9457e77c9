"""The networks and the trained model: the backbone registry (EfficientNet, Hugging Face towers), the MvMF and
RRM heads, :class:`~geoswc.models.geomodel.GeoModel` with its files and fingerprints, ONNX export, and the
one compatibility check between artifacts.
"""
