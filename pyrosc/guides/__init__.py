"""Amortized guides, one file per model of the same name in :mod:`pyrosc.models`."""

from pyrosc.guides.vae import vae_guide

__all__ = ["vae_guide"]
