"""The front door of the services on Ray Serve: the standalone services' HTTP server and request checks in front of
Serve's proxy, which cannot be set up to refuse what a standalone service refuses before a request reaches the app (it
reads bodies ahead, before the key or size is checked, and has no header bound, idle timeout or connection cap).
Serve's proxy moves to loopback; the front door checks each request with the application's own settings, receives
its body whole within those limits, and only then sends it on. docs/ray.md says how to run it and what it costs.

config.py: the applications of a Serve config and the config Serve runs; resources.py: what the replicas ask of the
cluster; health.py: /health while no replica runs; forward.py: the request on to Serve's proxy; app.py: the ASGI app;
__main__.py: the command (``python -m cluster.front``).
"""
