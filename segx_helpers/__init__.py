"""segx_helpers: the reusable code behind the SegX / SegU tutorial notebooks."""
__version__ = "0.1.0"
