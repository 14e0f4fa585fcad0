"""Reading, building, merging and writing distilvit-format checkpoints."""
