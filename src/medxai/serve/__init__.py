"""The service: a run folder served over HTTP (FastAPI on uvicorn), with micro-batching, limits, a bearer token,
Prometheus metrics, an audit log and a page for people at ``/`` (see ``docs/serve.md``).

The last stage of the pipeline: it may import every earlier stage and :mod:`medxai.classifier`, never a job.
"""
