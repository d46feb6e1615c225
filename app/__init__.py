"""The VPTQ Chat desktop GUI (PySide6 + qasync). Never imports torch."""

__version__ = "0.1.0"
