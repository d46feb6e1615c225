"""Widgets only: main window, chat view, sidebar models, live panel."""
