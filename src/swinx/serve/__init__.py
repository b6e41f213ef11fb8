"""`swinx serve`: an HTTP inference server with dynamic batching (app.py, batching.py)."""
