"""Retrievers: one class per way of finding the chunks that answer a question (see `registry`)."""
