"""tileflow: decode DeepSeek models near the memory-bandwidth limit."""

__version__ = "0.1.0"
