"""The interactive editing demo (``python -m editbench demo``): engine and Gradio page."""
