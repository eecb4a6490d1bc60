"""The HTTP API (``ai-handler serve``): applications submit, follow and cancel generations and
read credits over HTTP; Replicate posts its webhooks to the same service.

FastAPI on uvicorn: FastAPI gives typed request bodies with field-level validation errors and an
OpenAPI document from the same code, uvicorn a production ASGI server with workers. ``app.py``
builds the app; ``routes/`` holds the routes by story; ``deps.py`` the authentication;
``problems.py`` the RFC 9457 errors.
"""
