"""CPython support: where interpreters keep their frames, and reading them back."""
