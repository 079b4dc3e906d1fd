"""The model store: immutable versions, their records, and a pointer to the current one, under an exclusive lock."""
