"""The HTTP routes: thin wrappers that validate, call one service function and return."""
