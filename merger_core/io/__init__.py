"""Safetensors on disk: the header reader and the dtype table (:mod:`.safetensors`), the streaming writer
(:mod:`.writer`) and the merge's input reader (:mod:`.reader`)."""
