"""The build: options → plan → weights → templates → records → swap into place."""
