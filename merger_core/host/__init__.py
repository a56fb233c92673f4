"""The machine the engine runs on: where user data lives (:mod:`.userdirs`) and desktop notices (:mod:`.notify`)."""
