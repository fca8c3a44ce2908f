"""An OpenAI-compatible HTTP server and a web chat page for a trained QingLM run (`qinglm serve`).

config.py holds ServeConfig, protocol.py the request checks and OpenAI response shapes,
scheduler.py the worker thread that owns the model, http.py the checks every request passes first
(Host, content type, body size) and uvicorn's limits, app.py the FastAPI routes, static/ the chat page.
"""
