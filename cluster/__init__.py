"""Embedding work spread over a Ray cluster, on the same encoders, preprocessing and routes as the standalone
services: bulk import of an image folder or bucket with Ray Data (``python -m cluster.index_images``) and both
services as Ray Serve applications (``serve run cluster/serve_config.yaml``, built in ``cluster/serve.py``).

Optional: needs ``requirements-cluster.txt`` (Ray). The standalone services never import this package, and nothing
outside it imports Ray.
"""
