"""Merging: plans (:mod:`.plan`), the streaming loop (:mod:`.runner`), sinks, devices, output metadata, block
weights and the cross-merge and train-difference recipes that build plans."""

from .plan import KeyJob, MergeInput, MergePlan, PreparedMerge, prepare  # noqa: F401
from .runner import MergeResult, ProgressInfo, merge_to_file, merge_to_state_dict  # noqa: F401
