"""The ``summarize`` agent: summaries of a folder's text files into the owner's storage."""
