"""arq workers: Instagram fetches and LLM persona replies (see the open issues)."""
