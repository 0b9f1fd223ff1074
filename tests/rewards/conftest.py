"""The reward tests never reach the hub: every model is built tiny and loaded from tmp files."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
