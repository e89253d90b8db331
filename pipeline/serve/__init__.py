"""`python -m pipeline.serve --model M`: the pipeline behind an HTTP API that speaks OpenAI's Images API.

One model per process. The rooms:

    config.py    ServeConfig: what a server (or a Ray replica) is started with
    schemas.py   the request and response bodies (OpenAI Images API, plus our extras) and error bodies
    service.py   ImageService: loads the pipeline, turns a request into a Job (validated, before any GPU work),
                 turns finished images into PNGs
    jobs.py      Job, BatchKey, JobState, BatchResult, and the errors that end a job (queue full, timeout,
                 server stopping)
    worker.py    the bounded queue, same-shape batching into one pipeline call, timeouts, cancellation,
                 progress
    store.py     the PNG files behind `url` responses (atomic writes, bounded)
    app.py       the FastAPI routes: /v1/images/generations, /v1/models, /health, /v1/images/{id}.png,
                 /v1/progress/{id}, and the web page at /
    page.html    the web page (plain HTML and a little JavaScript)
    ray_app.py   the same app as a Ray Serve deployment, one replica per GPU
    __main__.py  the command line
    launch.py    start a server as a child process and wait for it (tests, browser and load scripts)

The plain server needs the `serve` extra (fastapi, uvicorn); Ray Serve the `serve-ray` extra.
"""
