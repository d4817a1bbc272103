"""Running the services beyond one box: Ray Serve applications (serve.py) built from the same service code."""
