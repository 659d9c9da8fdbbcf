"""The server-rendered UI for QA staff (Jinja2 templates, a little plain JavaScript, no build step)."""
