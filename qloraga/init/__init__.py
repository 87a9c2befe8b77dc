"""The initialisation: the full fine-tuning gradient of every target layer on the dequantized weights
(`gradient.py` exact, chunk by chunk under `chunks.py`'s memory model; `sketch.py` streaming), the factors
it gives (`factors.py`, pure tensor math), a resumable cache (`cache.py`), and the loop that joins them
(`pipeline.py`)."""
