"""One thin module per DVC stage: parse the config, call the clawly library, write outputs."""
