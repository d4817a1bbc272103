"""Embedding work spread over a Ray cluster: bulk import of an image folder or bucket with Ray Data
(``python -m cluster.index_images``).

Optional: needs ``requirements-cluster.txt`` (Ray). The standalone services never import this package, and nothing
outside it imports Ray.
"""
