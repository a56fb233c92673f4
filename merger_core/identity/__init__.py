"""What a file is by its bytes: hashes (:mod:`.hashing`), the SQLite cache (:mod:`.cache`), the base-model registry
(:mod:`.bases`) and CivitAI (:mod:`.civitai`)."""
