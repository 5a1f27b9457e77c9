"""The web service: ``geoswc serve`` runs :func:`geoswc.service.app.create_app` under uvicorn (FastAPI, a map page at
``/``), with :class:`geoswc.service.settings.ServiceSettings`.

Needs the ``fastapi``, ``uvicorn`` and ``python-multipart`` packages; nothing is imported until used.
"""
