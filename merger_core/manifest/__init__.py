"""Manifests: the versioned JSON list of models and weights, and the scan that finds the models."""

from .model import *  # noqa: F401,F403
