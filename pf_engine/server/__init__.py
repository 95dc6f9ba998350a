"""``pf-engine serve``: an OpenAI-compatible HTTP server over one long-lived scheduler."""
