"""The OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra) on top of fp6llm.engine.

``app.create_app(engine, model_name)`` builds the app; ``fp6llm serve`` runs it. Nothing here is imported by
``import fp6llm``, so the library works without fastapi installed.
"""
