"""The ``chat`` agent: a conversation with the model that remembers what was said."""
