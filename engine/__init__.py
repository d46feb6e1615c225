"""The VPTQ Chat inference engine. Kept torch-free so the GUI can import engine.protocol cheaply."""

__version__ = "0.1.0"
