"""Merge methods: the registry (:mod:`.registry`) and one small module per method, each registering itself."""

from .registry import KeyContext, MergeMethod, Param, get_method, list_methods, register  # noqa: F401

from . import weighted_sum
from . import add_difference
from . import train_difference
from . import task_arithmetic
from . import ties
from . import dare
from . import slerp
