"""Reading and writing adapter files (HF PEFT layout) and other artifacts, atomically."""
