"""BentoSVD's work, kept free of BentoML: image handling, the SVD pipeline, video encoding.

`service.py` at the repository root is the HTTP edge; everything here runs and is tested
without a server.
"""
